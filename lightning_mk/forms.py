"""How a kernel's copies are stored, sampled and folded: :class:`Form`, the built-in forms and :func:`register_form`.

A form owns the layout of the one trainable tensor that replaces a kernel ``W`` (shape ``S``): how it is made
from the initial copies, which of its rows the scheme combines in a training step, the training kernel made
from that combination, the deployed (eval-mode) kernel, the ``[k, *S]`` copies it stands for, and their
spread. A form that is not :attr:`~Form.random` is a :class:`Reparametrisation` (:class:`DOConv`, :class:`Expand`):
training uses its deployed kernel too. Add your own with :func:`register_form`; it is then selectable by name everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_mk import native
from lightning_mk.schemes import Random, Select

__all__ = ["Form", "Copies", "Decoupled", "Relative", "Reparametrisation", "DOConv", "Expand", "FORMS", "register_form", "get_form"]


class Form:
    """A way to store a kernel's ``k`` copies. The defaults store the copies themselves (:class:`Copies`);
    a form overrides what differs, keeping every training kernel an unbiased draw around :meth:`deployed`."""

    name: str = ""
    extra_rows = 0  #: rows the stored tensor has besides one per copy
    init_noise = 0.0  #: the relative noise on the initial copies when ``init_noise`` is not given
    #: False: a training step uses the deployed kernel itself (a re-parametrisation: no draw, no noise level)
    random = True

    takes = "every kernel"  #: which kernels :meth:`supports`, in words (for error messages)

    def supports(self, layer: nn.Module, weight: Tensor) -> bool:
        """Whether ``layer``'s kernel ``weight`` takes this form (others are left plain)."""
        return True

    def store(self, copies: Tensor, weight: Tensor, replicated: bool, seed: int) -> Tensor:
        """The stored tensor of a kernel whose initial copies are ``copies`` (made from ``weight``; all equal
        to it, before any noise, when ``replicated``); ``seed`` keys any randomness it needs (the same in
        every process, its own for each kernel)."""
        return copies

    def rows(self, stored: Tensor) -> Tensor:
        """The ``[k, *S]`` rows the scheme combines in a training step (their gradients are scaled by
        ``grad_scale``)."""
        return stored

    def split(self, stored: Tensor) -> tuple[Tensor, Tensor]:
        """``(head, rows)``: what :meth:`sample` and :meth:`deployed` read besides the rows (by default the stored
        tensor itself), and :meth:`rows`. A form whose head and rows are parts of the stored tensor takes both
        in one operation, so that a training step's backward writes the stored tensor's gradient once."""
        return stored, self.rows(stored)

    def sample(self, head: Tensor, rows: Tensor, combined: Tensor) -> Tensor:
        """The training kernel, from the scheme's combination of ``rows``."""
        return combined

    def deployed(self, head: Tensor, rows: Tensor) -> Tensor:
        """The eval-mode kernel, which the noise level shrinks a sample towards and collapsing keeps."""
        return _mean(rows)

    def copies(self, stored: Tensor) -> Tensor:
        """The ``[k, *S]`` copies the stored tensor stands for."""
        return stored

    def spread(self, rows: Tensor, first: int, n_rows: int, total: Callable[[Tensor], Tensor]) -> float:
        """RMS distance of the copies from the deployed kernel, relative to its RMS, from ``rows`` ``first``,
        ``first + 1``, ... of the stored tensor (all ``n_rows`` of them, or this process's share: ``total``
        sums a tensor over the processes holding the others)."""
        k = n_rows - self.extra_rows
        center = total(rows.sum(0)) / k
        return _relative(total((rows - center).pow(2).sum().reshape(1)), k, center)


class Copies(Form):
    """Store the ``k`` copies (``[k, *S]``): a step combines them, the deployed kernel is their mean, which
    gets 1/k of the sampled kernel's gradient (it trains k times slower than the plain model under SGD)."""

    name = "copies"


class Decoupled(Form):
    """Store the deployed kernel ``mu`` and ``k`` deviations (``[k + 1, *S]``, ``mu`` first): the copies are
    ``mu + delta_i - mean(delta)``, a step trains ``mu + combine(delta) - mean(delta)``, so ``mu`` gets the
    plain model's gradient (with all deviations zero this is plain training, under any optimizer)."""

    name = "decoupled"
    extra_rows = 1

    def store(self, copies: Tensor, weight: Tensor, replicated: bool, seed: int) -> Tensor:
        mu = weight.detach().clone() if replicated else copies.mean(0)
        return torch.cat([mu.unsqueeze(0), copies - mu])

    def rows(self, stored: Tensor) -> Tensor:
        return self.split(stored)[1]

    def split(self, stored: Tensor) -> tuple[Tensor, Tensor]:
        mu, rows = stored.split([1, len(stored) - 1])  # the head is [1, *S]: mu is head[0]
        return mu, rows

    def scale(self, mu: Tensor, deviations: Tensor, center: Tensor) -> Optional[Tensor]:
        """The factor (no gradient) on a sample's offset from ``mu``; None: 1."""
        return None

    def sample(self, head: Tensor, rows: Tensor, combined: Tensor) -> Tensor:
        center = _mean(rows)
        offset, scale = combined - center, self.scale(head[0], rows, center)
        return head[0] + (offset if scale is None else offset * scale)  # unbiased around mu for every scheme

    def select(self, stored: Tensor, scheme: Select, random: Random, level: Tensor, decay: Optional[Tensor],
               grad_scale: float) -> Tensor:
        """:meth:`sample` of the ``select`` scheme's combination (the CPU kernel's draw of ``scheme.stream``, or
        ``scheme.index``: the copy each element takes) at noise ``level``, with L2 ``decay`` (None: none) on ``mu``: the
        training kernel as one autograd node, whose backward writes the stored tensor's gradient in one pass (the
        general composition writes and sums several of its size); the deviations' gradients times ``grad_scale``. The
        CPU kernel computes the centre, and the relative form's noise scale, in its own passes."""
        with torch.no_grad():  # the stored tensor is split here only, with no autograd node
            mu, deviations = self.split(stored)
            level = level.to(stored.dtype)
            stream = scheme.stream(deviations, random)  # the CPU kernel's draw, or None
            own = type(self).scale not in (Decoupled.scale, Relative.scale)  # a subclass's scale, by stock ops
            normalise = stream is not None and type(self).scale is Relative.scale  # in the kernel's own pass
            center = _mean(deviations) if stream is None or own else None
            scale = None if normalise else self.scale(mu[0], deviations, center)
        c = level if scale is None else level * scale
        if stream is not None:
            return native.select_around(stored, *stream, c, normalise, decay, grad_scale)
        return _Selected.apply(stored, scheme.index(deviations, random), center, c, decay, grad_scale)

    def deployed(self, head: Tensor, rows: Tensor) -> Tensor:
        return head[0]

    def copies(self, stored: Tensor) -> Tensor:
        head, deviations = self.split(stored)
        return self.sample(head, deviations, deviations)  # each deviation as the combination

    def spread(self, rows: Tensor, first: int, n_rows: int, total: Callable[[Tensor], Tensor]) -> float:
        # the copies' offsets from mu are the deviations' offsets from their mean
        k = n_rows - 1
        deviations = rows[1:] if first == 0 else rows
        mu = rows[0] if first == 0 and len(rows) else rows.new_zeros(rows.shape[1:])
        mu, center = total(torch.stack([mu, deviations.sum(0)]))
        return _relative(total((deviations - center / k).pow(2).sum().reshape(1)), k, mu)


class Relative(Decoupled):
    """Store ``mu`` and ``k`` deviations as :class:`Decoupled` does, but sample ``mu + s * (combine(delta) -
    mean(delta))`` with ``s`` (no gradient) making the copies' RMS distance from ``mu`` equal to ``mu``'s RMS:
    the noise level is then the sampled kernel's relative distance from ``mu`` in every layer, whatever the
    optimizer and the learning rate make of the deviations' size, and ``mu`` cannot escape it by growing. The
    deviations give the noise its shape (they start random, ``init_noise`` 1, and are trained like the copies).
    """

    name = "relative"
    init_noise = 1.0

    def scale(self, mu: Tensor, deviations: Tensor, center: Tensor) -> Optional[Tensor]:
        return _normaliser(mu, deviations, center)

    def spread(self, rows: Tensor, first: int, n_rows: int, total: Callable[[Tensor], Tensor]) -> float:
        # 1 by construction (0 while the deviations are all equal)
        return float(super().spread(rows, first, n_rows, total) > 0)


class _Selected(torch.autograd.Function):
    """``mu + c * (deviations[index] - center)`` from the stored ``[mu, deviations]`` (``center``, their mean, and ``c``
    are given without gradient; ``index``: the copy each element takes, ``[1, n]``), with L2 ``decay`` on ``mu``:
    :meth:`Decoupled.select` in stock ops, where the CPU kernel does not run (:func:`~lightning_mk.native.select_around`
    is the same node). The gradient is ``g + decay mu`` for ``mu`` and ``grad_scale c g (onehot_i - 1/k)`` for deviation
    ``i``, written into one uninitialised tensor."""

    @staticmethod
    def forward(stored: Tensor, index: Tensor, center: Tensor, c: Tensor, decay: Optional[Tensor], grad_scale: float) -> Tensor:
        flat = stored.reshape(len(stored), -1)
        return flat[1:].gather(0, index).view(-1).sub_(center.view(-1)).mul_(c).add_(flat[0]).view(stored.shape[1:])

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        stored, index, center, c, decay, grad_scale = inputs
        ctx.save_for_backward(stored, c, decay, index)
        ctx.grad_scale = grad_scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        stored, c, decay, index = ctx.saved_tensors
        k, scale = len(stored) - 1, c * ctx.grad_scale
        if torch.is_grad_enabled():  # a double backward (create_graph): differentiable ops only
            g, mu = grad.reshape(1, -1), stored[0].reshape(1, -1)
            offset = g * scale  # the gradient of the chosen deviation
            mu_grad = g if decay is None else g + decay.to(g.dtype) * mu
            deviations_grad = offset.new_zeros(k, offset.shape[1]).scatter_add(0, index, offset) - offset / k
            return torch.cat([mu_grad, deviations_grad]).view_as(stored), None, None, None, None, None
        stored_grad = grad.new_empty(stored.shape)
        if decay is None:
            stored_grad[0] = grad
        else:
            torch.addcmul(grad, decay.to(grad.dtype), stored[0], out=stored_grad[0])
        # offset - offset/k at the drawn copy, -offset/k at the others
        offset, rows = grad.reshape(1, -1) * scale, stored_grad[1:].view(k, -1)
        torch.mul(offset.expand(k, -1), -1 / k, out=rows)
        rows.scatter_add_(0, index, offset)
        return stored_grad, None, None, None, None, None


class Reparametrisation(Form):
    """A deterministic form: training uses the deployed kernel itself (no draw, no noise level); the stored
    tensor stands for that one kernel, so its copies are the kernel and their spread is zero. Its rows are the
    stored tensor, which :meth:`deployed` folds."""

    random = False

    def copies(self, stored: Tensor) -> Tensor:
        return self.deployed(*self.split(stored)).unsqueeze(0)

    def spread(self, rows: Tensor, first: int, n_rows: int, total: Callable[[Tensor], Tensor]) -> float:
        return 0.0


class DOConv(Reparametrisation):
    """Depthwise over-parametrised convolution (DO-Conv; Cao et al., 2020): a ``kh x kw`` kernel ``W`` is trained
    as ``W'[o, i, s] = W[o, i, s] + sum_d W[o, i, d] D[d, i, s]``, one trainable ``(kh kw) x (kh kw)`` matrix ``D``
    per input channel, and folded into ``W'``. ``D`` starts at zero, so the model starts as it was (pretrained
    weights too). Stored as ``[1, out + kh kw, in, kh, kw]`` (``W``, then ``D[d, i, s]`` in row ``out + d``).
    Only kernels with more than one spatial tap: for 1x1 convolutions and Linear layers it is a plain weight.
    Deterministic: ``k``, the scheme and the noise level have no effect."""

    name = "doconv"
    takes = "convolution kernels with more than one tap (a 1x1 convolution or a Linear layer stays plain)"

    def supports(self, layer: nn.Module, weight: Tensor) -> bool:
        return weight.dim() >= 3 and math.prod(weight.shape[2:]) > 1

    def store(self, copies: Tensor, weight: Tensor, replicated: bool, seed: int) -> Tensor:
        w = weight.detach() if replicated else copies[0]
        taps = math.prod(w.shape[2:])
        return torch.cat([w, w.new_zeros(taps, *w.shape[1:])]).unsqueeze(0)

    def deployed(self, head: Tensor, rows: Tensor) -> Tensor:
        taps = math.prod(rows.shape[3:])
        w, d = rows[0, :-taps], rows[0, -taps:]
        depthwise = torch.einsum("oid,dis->ois", w.flatten(2), d.flatten(2))
        return w + depthwise.view_as(w)


class Expand(Reparametrisation):
    """ExpandNets (Guo, Alvarez, Salzmann, 2020): a kernel ``W`` (``[out, in, *taps]``) trained as the product
    ``C B A`` of three linear factors, ``A [k in, in]``, ``B [k out, k in, *taps]``, ``C [out, k out]`` (a Linear
    layer in -> k in -> k out -> out; a convolution 1x1 -> kxk -> 1x1, ExpandNets' "CL" expansion) and contracted
    into ``W`` for deployment; ``k`` is the expansion factor. At the start the product is the kernel itself (``A``
    and ``C`` random with orthonormal columns and rows, ``B = C^T W A^T``), so a pretrained model starts exact.

    Stored as ``[k, out, k in + e, *taps]``: slice ``j`` holds row block ``j`` of ``B`` (columns ``:k in``), and in
    its last ``e`` columns, flattened, column block ``j`` of ``C`` transposed, then row block ``j`` of ``A``, then
    fewer than ``out * taps`` zeros of padding that get no gradient (``e``, the fewest columns that hold them, makes
    the layout tell ``in`` apart). Deterministic: the scheme and the noise level have no effect. Not for
    embedding tables."""

    name = "expand"
    takes = "kernels of Linear, convolution and recurrent layers (an embedding table stays plain)"

    def supports(self, layer: nn.Module, weight: Tensor) -> bool:
        return weight.dim() >= 2 and not isinstance(layer, nn.Embedding)

    def store(self, copies: Tensor, weight: Tensor, replicated: bool, seed: int) -> Tensor:
        w = (weight.detach() if replicated else copies[0]).float()
        k, (out, n_in), taps = copies.shape[0], w.shape[:2], w.shape[2:]
        generator = torch.Generator(w.device).manual_seed(seed)
        a = torch.linalg.qr(torch.randn(k * n_in, n_in, generator=generator, device=w.device)).Q  # A^T A = I
        c = torch.linalg.qr(torch.randn(k * out, out, generator=generator, device=w.device)).Q.T  # C C^T = I
        b = torch.einsum("op,oit,qi->pqt", c, w.reshape(out, n_in, -1), a)
        extra = w.new_zeros(k, out * _expand_extra(out, n_in, math.prod(taps)) * math.prod(taps))
        extra[:, : out * out] = c.reshape(out, k, out).permute(1, 2, 0).reshape(k, -1)
        extra[:, out * out : out * out + n_in * n_in] = a.reshape(k, -1)
        stored = torch.cat([b.reshape(k, out, k * n_in, *taps), extra.view(k, out, -1, *taps)], 2)
        return stored.to(weight.dtype)

    def deployed(self, head: Tensor, rows: Tensor) -> Tensor:
        k, out, columns, *taps = rows.shape
        n_in = _expand_in(k, out, columns, math.prod(taps))
        b = rows[:, :, : k * n_in].reshape(k * out, k * n_in, -1)
        extra = rows[:, :, k * n_in :].reshape(k, -1)
        c = extra[:, : out * out].reshape(k, out, out).permute(2, 0, 1).reshape(out, k * out)
        a = extra[:, out * out : out * out + n_in * n_in].reshape(k * n_in, n_in)
        if out <= n_in:  # the cheaper order of the two contractions
            w = torch.einsum("oqt,qi->oit", torch.einsum("op,pqt->oqt", c, b), a)
        else:
            w = torch.einsum("op,pit->oit", c, torch.einsum("pqt,qi->pit", b, a))
        return w.reshape(out, n_in, *taps)


def _expand_extra(out: int, n_in: int, taps: int) -> int:
    """The columns after ``B`` in :class:`Expand`'s layout: the fewest that hold ``C``'s and ``A``'s blocks."""
    return -(-(out * out + n_in * n_in) // (out * taps))


def _expand_in(k: int, out: int, columns: int, taps: int) -> int:
    """The ``in`` of an :class:`Expand` layout with ``columns = k in + _expand_extra(out, in, taps)``: increasing in
    ``in``, so one fits; it lies next to the root of ``k n + (out^2 + n^2) / (out taps) = columns``."""
    a = out * taps
    root = (math.sqrt(k * k * a * a + 4 * (columns * a - out * out)) - k * a) / 2
    for n_in in range(max(1, int(root) - 1), int(root) + 3):
        if k * n_in + _expand_extra(out, n_in, taps) == columns:
            return n_in
    raise ValueError(f"not a stored form='expand' kernel: k={k}, out={out}, {columns} columns, {taps} taps")


def _mean(rows: Tensor) -> Tensor:
    """The rows' mean as their sum over k: its backward broadcasts the gradient (``mean``'s writes k copies of it)."""
    return rows.sum(0) / len(rows)


def _normaliser(mu: Tensor, deviations: Tensor, center: Tensor) -> Tensor:
    """RMS(mu) / RMS(deviations - center), a constant to autograd (at most 1e6: equal deviations give no noise)."""
    with torch.no_grad():
        if not torch.compiler.is_compiling() and native.handles(deviations):
            return native.normaliser(mu, deviations, center)  # no [k, *S] difference (compiled, inductor fuses it)
        return _rms_ratio(mu, deviations - center)


def _rms_ratio(mu: Tensor, offsets: Tensor) -> Tensor:
    """RMS(mu) / RMS(offsets), at most 1e6, in stock ops."""
    size = _rms(mu)
    return size / _rms(offsets).clamp_min(1e-6 * size).clamp_min(1e-30)


def _rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(x.numel())  # one pass, no squared temporary


def _relative(distance: Tensor, k: int, center: Tensor) -> float:
    """sqrt(mean squared distance over k copies) / RMS of ``center``, from the summed squared distance."""
    return (distance / (k * center.pow(2).sum().clamp_min(1e-24))).sqrt().item()


#: The forms, by name (``copies`` and ``decoupled`` built in).
FORMS: dict[str, Form] = {}


def register_form(form: Form) -> Form:
    """Make ``form`` (an instance) selectable by its ``name`` everywhere: the callback, the raw API, configs."""
    if not isinstance(form, Form):
        raise TypeError(f"register_form takes a Form instance, got {form!r}")
    if not isinstance(form.name, str) or not form.name or form.name in FORMS:
        raise ValueError(f"a form needs a new, non-empty name; registered: {list(FORMS)}, got {form.name!r}")
    FORMS[form.name] = form
    return form


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise ValueError(f"unknown form {name!r}; valid forms: {list(FORMS)}")
    return FORMS[name]


register_form(Copies())
register_form(Decoupled())
register_form(Relative())
register_form(DOConv())
register_form(Expand())
