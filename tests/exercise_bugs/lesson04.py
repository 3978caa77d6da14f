"""Planted bugs for lesson 4's exercises: each must be caught by the hint named beside it."""

from torch import nn

from pedaPEFT import adapters


class _Adapter(nn.Module):
    residual, zero_up, zero_down, activation = True, True, False, staticmethod(nn.functional.gelu)

    def __init__(self, d_model, bottleneck):
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        if self.zero_up:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        if self.zero_down:
            nn.init.zeros_(self.down.weight)

    def forward(self, h):
        branch = self.up(self.activation(self.down(h)))
        return h + branch if self.residual else branch


class AdapterRandomUp(_Adapter):
    zero_up = False


class AdapterNoResidual(_Adapter):
    residual = False


class AdapterNoActivation(_Adapter):
    activation = staticmethod(lambda x: x)


class AdapterZeroDown(_Adapter):
    zero_down = True


def _insert(model, bottleneck, names=("o", "proj"), freeze=True, size_by_input=False):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in names:
            size = module.in_features if size_by_input else module.out_features
            parent = model.get_submodule(name.rpartition(".")[0])
            adapter = adapters.BottleneckAdapter(size, bottleneck)
            setattr(parent, name.rpartition(".")[2], adapters.WithAdapter(module, adapter))
    if freeze:
        for param_name, param in model.named_parameters():
            param.requires_grad = ".adapter." in param_name


def insert_only_after_o(model, bottleneck):
    _insert(model, bottleneck, names=("o",))


def insert_without_freezing(model, bottleneck):
    _insert(model, bottleneck, freeze=False)


def insert_sized_by_input(model, bottleneck):
    _insert(model, bottleneck, size_by_input=True)


def insert_everywhere(model, bottleneck):
    _insert(model, bottleneck, names=("q", "k", "v", "o", "fc", "proj"))


BUGS = {
    "04-bottleneck-adapter": [
        (AdapterRandomUp, "initialise the up-projection"),
        (AdapterNoResidual, "the residual connection"),
        (AdapterNoActivation, "no nonlinearity"),
        (AdapterZeroDown, "the down-projection is zero too"),
    ],
    "04-insert-adapters": [
        (insert_only_after_o, "have no adapter"),
        (insert_without_freezing, "the base model still trains"),
        (insert_sized_by_input, "wrong d_model"),
        (insert_everywhere, "layers other than o and proj"),
    ],
    "04-bert-adapter": [
        (2 * 768 * 64, "add the biases"),
        (2 * 768 * 64 + 768, "both projections have a bias"),
    ],
}
