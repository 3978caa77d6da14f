"""A paged AdamW: optimizer states that live in host memory and visit the device in pages.

AdamW keeps two running moments per parameter (``pedaPEFT.adamw`` states the update). Every
operation of the update is elementwise, so the update of a slice of θ needs only the same slice
of g, m and v. That is what makes paging possible: m and v (8 bytes per fp32 parameter, twice the
weights themselves) need not sit on the device all the time; it is enough that each slice is
there while it is updated.

bitsandbytes' paged optimizers (used by QLoRA) allocate m and v in CUDA *unified memory*
(``cudaMallocManaged``): the driver migrates 4 KB–2 MB pages to the GPU on a page fault and back
to the CPU when the GPU runs out, and bitsandbytes prefetches each state before its update.
:class:`PagedAdamW` does the same job with explicit, ordinary tools instead:

- a device **budget** in bytes for the optimizer states. States are placed first-fit, in
  parameter order; while everything fits, everything stays on the device and a step is a plain
  AdamW step (no copy at all);
- the states that do not fit live in **pinned host memory** (on CUDA) and are brought in
  **pages** of ``page_bytes`` through a small double buffer on the device: while the compute
  stream updates page i, a side CUDA stream copies page i + 1 in, and copies page i − 1 back
  out. Events order the two streams; nothing uses managed memory, so nothing can make a shared
  GPU thrash or hang;
- :meth:`PagedAdamW.set_budget` moves states between device and host when the budget changes
  (say, before a long-sequence batch that needs the memory for activations).

On a CPU the same code runs as a **simulated device**: the "device" is the CPU, the budget is
enforced for the states placed there, the evicted states live in a separate host store and are
copied in and out page by page, and :attr:`PagedAdamW.stats` counts every page and byte moved,
so the paging logic itself can be tested and taught on a laptop.

The update equals ``torch.optim.AdamW(amsgrad=False)`` (the tests compare them bit for bit on
CPU); ``state_dict`` has torch's layout plus an ``"optimizer"`` tag, and round-trips exactly.

What paging buys is shown on a simulated device in ``pedaPEFT.simulated_device`` (lesson 10).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pedaPEFT import adamw
from pedaPEFT.adamw import adamw_update, check_hyperparameters, check_state_dict, state_bytes

__all__ = ["PagedAdamW", "PagingStats", "adamw_update", "state_bytes"]

OPTIMIZER_TAG = "pedaPEFT.paged.PagedAdamW"
# 8 MiB per moment: over PCIe (tens of GB/s) copying a page takes longer than launching its
# update from Python, so the copies, not the launches, set the pace
DEFAULT_PAGE_BYTES = 8 * 1024 * 1024
STAGING_PAGES = 4  # two slots (double buffering) × two moments
PAGE_ALIGN = 8  # bytes; a page holds a whole number of elements of every float dtype
MIN_SENSIBLE_PAGE_BYTES = 4096  # smaller automatic pages cost more in launches than they move


@dataclass
class PagingStats:
    """What the optimizer placed where, and what it moved (bytes count both moments)."""

    budget_bytes: int
    resident_bytes: int = 0  # states planned on the device
    host_bytes: int = 0  # states planned in host memory
    staging_bytes: int = 0  # the device's page buffers (zero when nothing is evicted)
    pages_in: int = 0  # pages copied host -> device (a page holds both moments of one slice)
    pages_out: int = 0  # pages copied device -> host
    bytes_in: int = 0
    bytes_out: int = 0
    evictions: int = 0  # parameters whose states moved device -> host on a budget change
    recalls: int = 0  # parameters whose states moved host -> device on a budget change
    evicted_params: list[int] = field(default_factory=list)  # indices, in parameter order

    @property
    def device_bytes(self) -> int:
        """Device memory the optimizer holds: resident states plus the page buffers."""
        return self.resident_bytes + self.staging_bytes


@dataclass(frozen=True)
class _Page:
    param: Tensor
    start: int  # first element of the page in the flattened parameter
    stop: int


class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose states stay on ``device`` within ``budget_bytes`` and are paged beyond it.

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``. All must be
            floating-point, contiguous and on ``device``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (same defaults).
        amsgrad: only ``False`` is supported (as bitsandbytes' ``PagedAdamW`` defaults).
        budget_bytes: device memory the optimizer's states may use (resident states plus the
            page buffers). While all states fit, nothing is evicted.
        device: the device the budget is for; default: the device of the first parameter.
            ``cuda`` pages for real (pinned host memory, a side stream); ``cpu`` simulates a
            device (a separate host store, synchronous copies), counted the same way.
        page_bytes: bytes per moment in one page (a multiple of 8); default
            ``min(8 MiB, budget_bytes // 32)``, so the four page buffers use at most an eighth
            of the budget.

    Introduced in lesson 10,
    section "3. The package's version: a budget, pages and a double buffer".
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        budget_bytes: int,
        device: torch.device | str | None = None,
        page_bytes: int | None = None,
    ) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        if amsgrad:
            raise ValueError("amsgrad must be False: PagedAdamW implements AdamW without AMSGrad")
        self._budget_bytes = adamw.check_byte_count(budget_bytes, "budget_bytes")
        self._page_bytes_arg = page_bytes
        if page_bytes is not None:
            adamw.check_byte_count(page_bytes, "page_bytes")
            if page_bytes % PAGE_ALIGN:
                raise ValueError(f"page_bytes must be a multiple of {PAGE_ALIGN}, got {page_bytes}")
        self._device = None if device is None else self._normalize_device(torch.device(device))
        self._staging: Tensor | None = None
        self._side_stream = None
        self._copies_done = None
        self._evicted: set[Tensor] = set()
        self.stats = PagingStats(budget_bytes=budget_bytes)
        defaults = dict(lr=float(lr), betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- placement

    @staticmethod
    def _normalize_device(device: torch.device) -> torch.device:
        """``device`` checked to be CPU or CUDA, with the current CUDA index made explicit."""
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a 'cpu' or 'cuda' device, got {device}")
        if device.type == "cuda" and device.index is None:
            if not torch.cuda.is_available():
                raise ValueError("device is 'cuda', but no CUDA device is available")
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    @property
    def device(self) -> torch.device:
        """The device the budget is for."""
        assert self._device is not None
        return self._device

    @property
    def simulated(self) -> bool:
        """True when the device is the CPU and paging is simulated with a separate host store."""
        return self.device.type == "cpu"

    @property
    def page_bytes(self) -> int:
        """Bytes of one moment in one page."""
        if self._page_bytes_arg is not None:
            return self._page_bytes_arg
        return min(DEFAULT_PAGE_BYTES, self._budget_bytes // 32 // PAGE_ALIGN * PAGE_ALIGN)

    def _all_params(self) -> list[Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (as ``torch.optim.Optimizer``), checking every parameter, then re-plan."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group = {**param_group, "params": params}
        merged = {**self.defaults, **param_group}
        check_hyperparameters(merged["lr"], merged["betas"], merged["eps"],
                              merged["weight_decay"], "param group: ")
        offset = len(self._all_params())
        seen = {id(param) for param in self._all_params()}
        for index, param in enumerate(params, start=offset):
            if id(param) in seen:
                raise ValueError(f"params[{index}] appears twice: every parameter must be listed "
                                 "once (it would be updated twice per step)")
            seen.add(id(param))
            if not isinstance(param, Tensor):
                raise TypeError(f"params[{index}] must be a tensor, got {type(param).__name__}")
            if not param.is_floating_point():
                raise TypeError(f"params[{index}] must be floating point, got {param.dtype}")
            if not param.is_contiguous():
                raise ValueError(f"params[{index}] must be contiguous (pages are flat slices)")
            if self._device is None:
                self._device = self._normalize_device(param.device)
            if param.device != self._device:
                raise ValueError(
                    f"params[{index}] is on {param.device}, but the budget is for {self._device}: "
                    "every parameter must be on the budget's device"
                )
        super().add_param_group(param_group)
        self._apply_plan()

    def _plan(self) -> tuple[set[Tensor], int]:
        """First-fit placement: (evicted parameters, staging bytes) for the current budget."""
        params = self._all_params()
        if sum(state_bytes(param) for param in params) <= self._budget_bytes:
            return set(), 0
        staging = STAGING_PAGES * self.page_bytes
        if self._page_bytes_arg is None and PAGE_ALIGN <= self.page_bytes < MIN_SENSIBLE_PAGE_BYTES:
            warnings.warn(f"budget_bytes={self._budget_bytes} gives {self.page_bytes}-byte pages "
                          f"(budget_bytes // 32), below {MIN_SENSIBLE_PAGE_BYTES}: paging is very "
                          "slow; raise budget_bytes or pass page_bytes", stacklevel=4)
        if self.page_bytes < PAGE_ALIGN:
            raise ValueError(
                f"budget_bytes={self._budget_bytes} is too small to page: the default page is "
                f"budget_bytes // 32 and must hold {PAGE_ALIGN} bytes (budget_bytes >= "
                f"{32 * PAGE_ALIGN}), or pass page_bytes"
            )
        if staging > self._budget_bytes:
            raise ValueError(
                f"budget_bytes={self._budget_bytes} cannot hold the {STAGING_PAGES} page buffers "
                f"of page_bytes={self.page_bytes}: use budget_bytes >= {STAGING_PAGES} * page_bytes"
            )
        free = self._budget_bytes - staging
        evicted = set()
        for param in params:
            if state_bytes(param) <= free:
                free -= state_bytes(param)
            else:
                evicted.add(param)
        return evicted, staging

    def _apply_plan(self) -> None:
        """Re-plan and move the states whose placement changed."""
        evicted, staging = self._plan()
        self._wait_for_copies()
        for param, state in self.state.items():
            if not state:
                continue
            if param in evicted and param not in self._evicted:
                self._move_state(state, to_host=True)
                self.stats.evictions += 1
            elif param not in evicted and param in self._evicted:
                self._move_state(state, to_host=False)
                self.stats.recalls += 1
        self._evicted = evicted
        if self._staging is not None and self._staging.numel() != staging:
            self._staging = None  # reallocated at the next step that pages
        params = self._all_params()
        host = sum(state_bytes(param) for param in evicted)
        self.stats.budget_bytes = self._budget_bytes
        self.stats.host_bytes = host
        self.stats.resident_bytes = sum(state_bytes(param) for param in params) - host
        self.stats.staging_bytes = staging
        self.stats.evicted_params = [i for i, param in enumerate(params) if param in evicted]

    def set_budget(self, budget_bytes: int) -> None:
        """Change the device budget; states that no longer fit are evicted, others come back.

        A budget too small to page raises ``ValueError`` and leaves everything as it was.
        """
        previous, self._budget_bytes = (
            self._budget_bytes, adamw.check_byte_count(budget_bytes, "budget_bytes"))
        try:
            self._plan()
        except ValueError:
            self._budget_bytes = previous
            raise
        self._apply_plan()

    def _host_empty(self, like: Tensor) -> Tensor:
        pin = self.device.type == "cuda"
        return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)

    def _new_state(self, param: Tensor) -> dict[str, Tensor]:
        if param in self._evicted:
            moments = [self._host_empty(param).zero_() for _ in range(2)]
        else:
            moments = [torch.zeros_like(param) for _ in range(2)]
        step = torch.tensor(0.0, dtype=torch.float32)
        return {"step": step, "exp_avg": moments[0], "exp_avg_sq": moments[1]}

    def _move_state(self, state: dict[str, Tensor], to_host: bool) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            tensor = state[key]
            if to_host:
                state[key] = self._host_empty(tensor).copy_(tensor)
            else:
                state[key] = tensor.to(self.device)

    # ----------------------------------------------------------------- streams

    def _side(self) -> contextlib.AbstractContextManager:
        if self.simulated:
            return contextlib.nullcontext()
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._side_stream)

    def _record(self) -> torch.cuda.Event | None:
        """An event on the current stream (None on the simulated device: copies are done)."""
        return None if self.simulated else torch.cuda.current_stream(self.device).record_event()

    def _wait(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _wait_for_copies(self) -> None:
        if self._copies_done is not None:
            self._copies_done.synchronize()
            self._copies_done = None

    # ----------------------------------------------------------------- the step

    def _pages(self, params: list[Tensor]) -> Iterator[_Page]:
        for param in params:
            page_numel = self.page_bytes // param.element_size()
            for start in range(0, param.numel(), page_numel):
                yield _Page(param, start, min(start + page_numel, param.numel()))

    def _slot(self, slot: int, moment: int, page: _Page) -> Tensor:
        """Device buffer for ``moment`` (0: exp_avg, 1: exp_avg_sq) of ``page`` in ``slot``."""
        assert self._staging is not None
        index = 2 * slot + moment
        raw = self._staging[index * self.page_bytes : (index + 1) * self.page_bytes]
        return raw.view(page.param.dtype)[: page.stop - page.start]

    def _host_slice(self, page: _Page, key: str) -> Tensor:
        return self.state[page.param][key].view(-1)[page.start : page.stop]

    def _copy(self, target: Tensor, source: Tensor) -> None:
        """Copy on the current stream; between pinned host and device memory, asynchronously."""
        target.copy_(source, non_blocking=True)

    def _page_in(self, page: _Page, slot: int) -> torch.cuda.Event | None:
        with self._side():
            for moment, key in enumerate(("exp_avg", "exp_avg_sq")):
                self._copy(self._slot(slot, moment, page), self._host_slice(page, key))
            loaded = self._record()
        self.stats.pages_in += 1
        self.stats.bytes_in += 2 * (page.stop - page.start) * page.param.element_size()
        return loaded

    def _page_out(self, page: _Page, slot: int, computed: torch.cuda.Event | None) -> None:
        with self._side():
            self._wait(computed)
            for moment, key in enumerate(("exp_avg", "exp_avg_sq")):
                self._copy(self._host_slice(page, key), self._slot(slot, moment, page))
        self.stats.pages_out += 1
        self.stats.bytes_out += 2 * (page.stop - page.start) * page.param.element_size()

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's Optimizer.step signature)
        """One AdamW step: resident states in one multi-tensor update, evicted ones page by page.

        Pages go through two slots: page i + 1 is copied in on the side stream while page i is
        updated on the compute stream, and page i is copied out once its update is done.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper = dict(
                lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                eps=group["eps"], weight_decay=group["weight_decay"],
            )
            resident: list[tuple[Tensor, dict[str, Tensor]]] = []
            paged: list[Tensor] = []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise TypeError("PagedAdamW does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state.update(self._new_state(param))
                if param in self._evicted:
                    paged.append(param)
                else:
                    resident.append((param, state))
            steps = [self.state[param]["step"] for param in paged]
            steps += [state["step"] for _, state in resident]
            if steps:
                torch._foreach_add_(steps, 1.0)
            if paged:
                self._prepare_paging()
            adamw_update(
                [param for param, _ in resident],
                [param.grad for param, _ in resident],
                [state["exp_avg"] for _, state in resident],
                [state["exp_avg_sq"] for _, state in resident],
                [state["step"].item() for _, state in resident],
                **hyper,
            )
            self._step_paged(paged, hyper)
        return loss

    def _prepare_paging(self) -> None:
        """Allocate the page buffers once, and start the side stream after queued work.

        Called before the resident update is queued, so that the first pages are copied in
        while it runs. Freshly allocated buffers may reuse memory that kernels already queued
        on the compute stream still touch, hence the wait.
        """
        if self._staging is None:  # allocated on the compute stream, kept across steps
            self._staging = torch.empty(
                self.stats.staging_bytes, dtype=torch.uint8, device=self.device
            )
        compute_ready = self._record()
        with self._side():
            self._wait(compute_ready)

    def _step_paged(self, params: list[Tensor], hyper: dict[str, float]) -> None:
        pages = list(self._pages(params))
        if not pages:
            return
        loaded = self._page_in(pages[0], slot=0)
        for i, page in enumerate(pages):
            slot = i % 2
            if i + 1 < len(pages):
                next_loaded = self._page_in(pages[i + 1], slot=1 - slot)
            self._wait(loaded)
            weights = page.param.view(-1)[page.start : page.stop]
            grads = page.param.grad.reshape(-1)[page.start : page.stop]
            adamw_update(
                [weights], [grads], [self._slot(slot, 0, page)], [self._slot(slot, 1, page)],
                [self.state[page.param]["step"].item()], **hyper,
            )
            self._page_out(page, slot, self._record())
            if i + 1 < len(pages):
                loaded = next_loaded
        if not self.simulated:
            with self._side():
                self._copies_done = self._record()

    # ----------------------------------------------------------------- saving

    def state_dict(self) -> dict:
        """torch's optimizer state dict, tagged with this optimizer's name.

        Evicted moments are returned as the host tensors they live in (torch also returns
        references, not copies); pending copies are finished first.
        """
        self._wait_for_copies()
        saved = super().state_dict()
        saved["optimizer"] = OPTIMIZER_TAG
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by :meth:`state_dict`; states go where the budget puts them."""
        if not isinstance(state_dict, dict) or state_dict.get("optimizer") != OPTIMIZER_TAG:
            found = state_dict.get("optimizer") if isinstance(state_dict, dict) else None
            raise ValueError(
                f"state_dict must come from PagedAdamW.state_dict() (tag {OPTIMIZER_TAG!r}), "
                f"got tag {found!r}: a state dict of another optimizer cannot be loaded"
            )
        groups, states = check_state_dict(state_dict)
        if len(groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"])
            for saved, group in zip(groups, self.param_groups, strict=True)
        ):
            raise ValueError(
                "state_dict has a different number of parameter groups or parameters than this "
                "optimizer"
            )
        self._wait_for_copies()
        loaded: dict[Tensor, dict[str, Tensor]] = {}  # checked in full before anything changes
        for saved, group in zip(groups, self.param_groups, strict=True):
            for index, param in zip(saved["params"], group["params"], strict=True):
                if index not in states:
                    continue
                values = states[index]
                for key in ("exp_avg", "exp_avg_sq"):
                    if values[key].shape != param.shape:
                        raise ValueError(
                            f"state {key!r} of parameter {index} has shape "
                            f"{tuple(values[key].shape)}, the parameter {tuple(param.shape)}"
                        )
                loaded[param] = values
        for saved, group in zip(groups, self.param_groups, strict=True):
            for key in ("lr", "betas", "eps", "weight_decay"):
                group[key] = tuple(saved[key]) if key == "betas" else saved[key]
            for param in group["params"]:
                self.state.pop(param, None)
                if param not in loaded:
                    continue
                values = loaded[param]
                state = self._new_state(param)
                state["step"].copy_(torch.as_tensor(values["step"], dtype=torch.float32))
                state["exp_avg"].copy_(values["exp_avg"])
                state["exp_avg_sq"].copy_(values["exp_avg_sq"])
                self.state[param] = state
