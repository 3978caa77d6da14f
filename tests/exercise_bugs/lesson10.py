"""Planted bugs for lesson 10's exercises, each with the hint that must name it.

``SOLUTIONS`` holds a right answer per exercise (the lesson's solution, written again here).
"""



def adamw_step(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay,
               bias_correction=True, decoupled=True, eps_inside=False, square=True,
               in_place=True):
    """The solution, with switches that plant the usual mistakes."""
    if not in_place:
        param = param * (1 - lr * weight_decay)
    elif decoupled:
        param.mul_(1 - lr * weight_decay)
    else:
        grad = grad + weight_decay * param
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).add_(grad * grad if square else grad, alpha=1 - beta2)
    m_hat = exp_avg / (1 - beta1**step) if bias_correction else exp_avg
    v_hat = exp_avg_sq / (1 - beta2**step) if bias_correction else exp_avg_sq
    denominator = (v_hat + eps).sqrt() if eps_inside else v_hat.sqrt() + eps
    if in_place:
        param.sub_(lr * m_hat / denominator)
    else:
        param = param - lr * m_hat / denominator
    return None


def state_bytes(param, moments=2):
    return moments * param.numel() * param.element_size()


def page_plan(params, budget_bytes, page_bytes, *, staging_always=False, no_staging=False,
              stop_at_first_miss=False, moments=2):
    """The solution, with switches that plant the usual mistakes."""
    total = sum(state_bytes(p, moments) for p in params)
    if total <= budget_bytes and not staging_always:
        return [], 0
    staging = 0 if no_staging else 4 * page_bytes
    free = budget_bytes - staging
    evicted = []
    for index, param in enumerate(params):
        if state_bytes(param, moments) <= free and not (stop_at_first_miss and evicted):
            free -= state_bytes(param, moments)
        else:
            evicted.append(index)
    return evicted, staging


def pages(param, page_bytes, *, per_page=None, drop_partial=False):
    """The solution, with switches that plant the usual mistakes."""
    per_page = page_bytes // param.element_size() if per_page is None else per_page
    n = param.numel()
    last = n - n % per_page if drop_partial else n
    return [(start, min(start + per_page, n)) for start in range(0, last, per_page)]


SOLUTIONS = {
    "10-adamw-step": adamw_step,
    "10-page-plan": page_plan,
    "10-pages": pages,
}

BUGS = {
    "10-adamw-step": [
        (lambda *a, **k: adamw_step(*a, **k, bias_correction=False), "bias correction missing"),
        (lambda *a, **k: adamw_step(*a, **k, decoupled=False), "added to the gradient"),
        (lambda *a, **k: adamw_step(*a, **k, eps_inside=True), "outside the square root"),
        (lambda *a, **k: adamw_step(*a, **k, square=False), "g²"),
        (lambda *a, **k: adamw_step(*a, **k, in_place=False), "in place"),
    ],
    "10-page-plan": [
        (lambda p, b, s: page_plan(p, b, s, staging_always=True), "nothing is paged"),
        (lambda p, b, s: page_plan(p, b, s, no_staging=True), "page buffers"),
        (lambda p, b, s: page_plan(p, b, s, stop_at_first_miss=True), "first fit"),
        (lambda p, b, s: page_plan(p, b, s, moments=1), "2 moments"),
    ],
    "10-pages": [
        (lambda p, s: pages(p, s, per_page=s), "page_bytes counts bytes"),
        (lambda p, s: pages(p, s, drop_partial=True), "the last, partial page"),
    ],
}
