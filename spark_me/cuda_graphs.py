"""CUDA graphs for the sparse encoder: capture its forward+backward once, replay per batch.

On a GPU the sparse encoder is host-bound: each of its ~1600 kernels per step ends before
the host has issued the next (docs/gpu.md, fourth run). A graph replays the captured
launches without the host. It fits SparK because a batch's shapes are fixed: every image
keeps exactly ``round(L·(1 − mask ratio))`` patches, so every scale has the same number of
sites in every batch of a given size, and once a batch's neighbour tables exist the
encoder's forward+backward reads nothing back to the host (tests/test_ops.py's sync audit).

Per shape (the signature: the gathered rows, the batch's extent, the autocast state, the
encoder's recomputation setting) the first batch is the *template* (or a batch of zero
images given to :meth:`EncoderGraphs.capture` ahead of training, as the trainer does
before its data loader starts): the encoder runs its
forward+backward on it once on the current stream (building and caching every table and
batch index), and is then captured by ``torch.cuda.make_graphed_callables``. That first run
must come before the capture's own warm-up: MinkowskiEngine launches its coordinate
kernels on CUDA's legacy default stream whatever stream is current, while its memory comes
from PyTorch's allocator on the current one, so maps built inside the warm-up (which runs
on a side stream) race with their readers; on an H100 that was an illegal memory access
(docs/gpu.md, fifth run). :func:`spark_me.ops.tables.check_coordinate_stream` refuses
such a build, so anything the first run missed fails the capture cleanly instead. Every
batch of that shape, the template included (its tables were built through MinkowskiEngine
for the capture and are now overwritten):

1. gets every table and batch index the template's encoder asked for, derived from its
   patch mask on the device (:mod:`spark_me.ops.mask_sites`: no MinkowskiEngine map and
   no host synchronisation), with every scale's sites in row-major order. That work, a few
   hundred small kernels, is itself captured as a second graph when the encoder is
   (:func:`capture_refill`), its patch mask a static input, so the host issues one copy
   and one replay for it; where that capture fails, it runs eagerly;
2. has them copied into the template's tables, which the captured kernels read (the index
   tables, the dense-map positions, Triton's inverse tables, the per-site batch indices);
3. replays the graph on its gathered features (row-major too: the gathers insert them so
   and MinkowskiEngine keeps that order, checked once on the template) and gets the
   per-scale features back as ``SparseTensor``\\ s on maps of its row-major sites,
   inserted into its coordinate manager, for densify.

What the graph captures is :meth:`~spark_me.encoders.base.SparseEncoder.forward_gathered`:
from the gathered visible pixels on, or with the dense stem from the first conv's gathered
output on. The dense stem's conv of the zero-filled image and its gathering (which reads
the number of visible sites back to the host) run before the replay, and the graph's
backward hands them the gradient of its input. A batch then has no full-resolution
coordinates, coordinate map or stem table to build before its replay (on an H100 a third
of ResNet-50's host time in its tables: docs/gpu.md, fourth run).

A batch whose tables differ from the template's in anything but their contents (row
counts; whether every site has all its neighbours cannot differ for a given shape) runs
eagerly, with a warning. The outputs live in the graph's static buffers: the next
replay overwrites them, so a step must finish (its backward included) before the next
forward, as training loops do.

So do the parameter gradients the graphed backward returns, and autograd keeps such a
buffer as a parameter's ``.grad`` when that was unset (it takes a fresh gradient over
rather than copying it; pytorch/pytorch#181723). With gradient accumulation the next
micro-batch's replay would overwrite that ``.grad`` before adding its own gradient to it:
twice the last micro-batch's gradient instead of the sum. Every run of a graph therefore
first gives the encoder's existing gradients memory of their own (:func:`own_gradients`;
nothing to do after ``zero_grad(set_to_none=True)``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import logging
from typing import Callable, Iterator, Optional

import MinkowskiEngine as ME
import torch
import torch.nn as nn

from spark_me.ops.mask_sites import MaskSites
from spark_me.ops.tables import TABLES_RANGE, NeighbourTables, TableCache
from spark_me.recompute import buffers_unchanged

log = logging.getLogger(__name__)

# Graphs kept per encoder (one per batch shape); a further shape runs eagerly.
MAX_GRAPHS = 2

GraphMaker = Callable[[nn.Module, tuple[torch.Tensor, ...]], Callable[..., tuple[torch.Tensor, ...]]]


def make_cuda_graph(body: nn.Module, sample: tuple[torch.Tensor, ...]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``body`` captured with its backward by ``torch.cuda.make_graphed_callables``, under
    the caller's autocast state with autocast's cast cache off (which capture requires).

    Where this PyTorch lets it (``capture_error_mode``), only this thread's calls are
    checked during the capture: a data loader's pin-memory thread that allocates pinned
    memory meanwhile would otherwise invalidate it (CUDA's global mode forbids such calls
    from any thread), and it never touches the captured stream."""
    dtype = torch.get_autocast_dtype("cuda")
    options = {"num_warmup_iters": 3, "allow_unused_input": True}
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        options["capture_error_mode"] = "thread_local"
    with torch.autocast("cuda", dtype=dtype, enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False):
        return torch.cuda.make_graphed_callables(body, sample, **options)


RefillMaker = Callable[[Callable[[], None], torch.device], Callable[[], None]]


def capture_refill(refill: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``refill`` (tensor work on tensors it holds, nothing returned) captured as a CUDA
    graph on ``device``; returns its replay. On another device, ``refill`` itself. Only this
    thread's calls are checked during the capture where PyTorch lets it (see
    :func:`make_cuda_graph`)."""
    if device.type != "cuda":
        return refill
    graph = torch.cuda.CUDAGraph()
    options = {}
    if "capture_error_mode" in inspect.signature(torch.cuda.graph).parameters:
        options["capture_error_mode"] = "thread_local"
    with torch.cuda.graph(graph, **options):
        refill()
    return graph.replay


@contextlib.contextmanager
def capture_guard(device: torch.device) -> Iterator[None]:
    """Around a capture: Python's cyclic garbage collector runs first and then not until
    the capture ends, and the current stream is put back afterwards.

    Why: torch no longer collects before a capture, and a collection inside it may free an
    earlier model's captured graphs (``make_graphed_callables`` leaves them in reference
    cycles, as does an encoder with its graphs); destroying a graph while a stream captures
    is not permitted and invalidates the capture (pytorch/pytorch#161037). And when the capture
    fails, ``torch.cuda.graph`` leaves its side stream current (its exit ends the capture
    before it restores the stream, and that end raised), so every later batch would build
    its maps off the default stream (the sixth GPU run: docs/gpu.md)."""
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
        current = torch.cuda.current_stream(device) if stream is not None else None
        if current is not None and current != stream:
            stream.wait_stream(current)  # what ran on the side stream comes before what follows
            torch.cuda.set_stream(stream)


class _Body(nn.Module):
    """The encoder's ``forward_gathered`` on the template batch's maps, as a function of the
    gathered features only: what the graph captures. Records the output tensor strides."""

    def __init__(self, encoder: nn.Module, template: ME.SparseTensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.key, self.manager = template.coordinate_map_key, template.coordinate_manager
        self.out_strides: list[int] = []

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = ME.SparseTensor(features, coordinate_map_key=self.key, coordinate_manager=self.manager)
        outputs = self.encoder.forward_gathered(x)
        self.out_strides = [f.tensor_stride[0] for f in outputs]
        return tuple(f.F for f in outputs)


@dataclasses.dataclass
class _RefillGraph:
    """A graph's refill, captured: copy a batch's patch mask into ``mask``, then ``run()``
    refills the tables and returns the batch's sites (static tensors, valid until the next run)."""
    mask: torch.Tensor
    run: Callable[[], Optional[MaskSites]]


@dataclasses.dataclass
class _Graph:
    body: _Body
    run: Callable[..., tuple[torch.Tensor, ...]]
    template: ME.SparseTensor  # keeps the template's manager, which holds the captured tables
    refill: Optional[_RefillGraph] = None  # None: the tables are refilled eagerly


class EncoderGraphs:
    """The captured graphs of one encoder, by batch shape; see the module docstring.

    ``make_graph`` captures (``body``, sample inputs) into a callable with the body's
    signature; the default is :func:`make_cuda_graph`. The tests pass the body itself,
    which runs the same refilled tables eagerly on the CPU. ``make_refill_graph`` likewise
    captures the tables' refill (:func:`capture_refill` on CUDA; None: refill eagerly).
    """

    def __init__(self, encoder: nn.Module, make_graph: GraphMaker = make_cuda_graph,
                 make_refill_graph: Optional[RefillMaker] = capture_refill) -> None:
        self.encoder = encoder
        self.make_graph = make_graph
        self.make_refill_graph = make_refill_graph
        self.graphs: dict[tuple, Optional[_Graph]] = {}  # None: its capture failed
        self.replays = 0  # batches run from a graph (each capture's first included)
        self.plain_runs = 0  # batches that fell back to the plain forward
        self._warned: set[str] = set()

    def forward_gathered(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        """``encoder.forward_gathered(x)``, replayed from a graph where the batch fits one."""
        cm = _gathered_manager(x)
        signature = self._signature(x)
        if signature in self.graphs and self.graphs[signature] is None:  # its capture failed
            return self._plain(x)
        graph = self.graphs.get(signature)
        if graph is None:
            if len(self.graphs) >= MAX_GRAPHS:
                self._warn("shapes", f"more than {MAX_GRAPHS} batch shapes: this one ({tuple(x.F.shape)}, extent "
                                     f"{cm.extent}) runs without a CUDA graph (keep the batch size and mask ratio fixed, "
                                     "e.g. drop the last incomplete batch)")
                return self._plain(x)
            graph = self._make(x, signature)
            if graph is None:
                return self._plain(x)
        return self._replay(graph, x)

    def _replay(self, graph: _Graph, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        """Refill ``graph``'s tables for ``x`` (replaying the captured refill where there is
        one), replay it on ``x``'s features, and return them on maps of ``x``'s sites."""
        with torch.profiler.record_function(TABLES_RANGE):
            if graph.refill is not None:
                graph.refill.mask.copy_(x.coordinate_manager.patch_mask)
                sites = graph.refill.run()
            else:
                sites = self._refill(graph, MaskSites.of(x))
        if sites is None:
            return self._plain(x)
        self.replays += 1
        own_gradients(self.encoder)
        features = graph.run(x.F)
        with torch.profiler.record_function(TABLES_RANGE):  # the output maps, for densify
            return _on_sites(features, graph.body.out_strides, sites, x)

    def _signature(self, x: ME.SparseTensor) -> tuple:
        encoder = self.encoder
        return (tuple(x.F.shape), x.F.dtype, x.tensor_stride[0], x.coordinate_manager.extent,
                torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
                encoder.grad_checkpointing, encoder.checkpoint_stages, encoder.dense_stem, x.F.requires_grad)

    def capture(self, x: ME.SparseTensor) -> bool:
        """Capture the graph for ``x``'s batch shape without running the batch (a template
        whose features do not matter: the encoder's parameters, gradients and buffers are
        left as they were). Returns whether a graph for that shape exists afterwards: False
        when the capture failed (with a warning) or the shape limit was reached."""
        _gathered_manager(x)
        signature = self._signature(x)
        if signature not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                self._warn("shapes", f"more than {MAX_GRAPHS} batch shapes: no graph captured for "
                                     f"{tuple(x.F.shape)}, extent {x.coordinate_manager.extent}")
                return False
            # the graph keeps its template: without the features' autograd history (a dense
            # stem's conv would otherwise keep its input image for a backward that never comes)
            template = ME.SparseTensor(x.F.detach().requires_grad_(x.F.requires_grad),
                                       coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
            self._make(template, signature)
        return self.graphs[signature] is not None

    def _make(self, x: ME.SparseTensor, signature: tuple) -> Optional[_Graph]:
        """Capture the encoder on ``x`` into ``self.graphs[signature]`` (None, with a
        warning, where the capture failed). The preparing, warm-up and capture runs leave
        the encoder's buffers (batch-norm statistics) as they found them, so the template
        batch updates them once, like any other. Every replayed batch's tables come from its
        patch mask in row-major order, so the gathered rows must be in that order: checked
        here once (a host read), on the template."""
        check_graphable(self.encoder)
        gathered = x.coordinate_manager.get_coordinates(x.coordinate_map_key).to(x.F.device)
        if not torch.equal(gathered, MaskSites.of(x).coordinates(x.tensor_stride[0])):
            self._warn("order", "the gathered sites are not in row-major order, which replays rely on; running the "
                                "encoder without CUDA graphs (gather with spark_me.gather.to_sparse or conv_to_sparse)")
            self.graphs[signature] = None
            return None
        body = _Body(self.encoder, x)
        sample = x.F.detach().requires_grad_(x.F.requires_grad)
        try:
            with buffers_unchanged(self.encoder), capture_guard(x.F.device):
                prepare(body, sample)
                run = self.make_graph(body, (sample,))
        except RuntimeError as e:  # e.g. an op that a capture does not allow: train on without graphs
            if cuda_context_lost(x.F.device):
                raise RuntimeError("capturing the encoder as a CUDA graph broke this process's CUDA context, so "
                                   "nothing more can run in it; train with trainer.cuda_graphs=false and report "
                                   f"this error: {type(e).__name__}: {e}") from e
            self._warn("capture", f"capturing the encoder as a CUDA graph failed ({type(e).__name__}: {e}); "
                                  "running it without graphs (trainer.cuda_graphs=false silences this)")
            self.graphs[signature] = None
            return None
        self.graphs[signature] = graph = _Graph(body, run, x)
        log.info("captured the encoder's forward+backward as a CUDA graph for batches of %d sites (%d tables)",
                 x.F.shape[0], len(x.coordinate_manager.neighbour_tables))
        if self.make_refill_graph is not None:
            graph.refill = self._capture_refill(graph, x)
        return graph

    def _capture_refill(self, graph: _Graph, x: ME.SparseTensor) -> Optional[_RefillGraph]:
        """The refill of ``graph``'s tables as a graph of its own (a few hundred small
        kernels the host no longer issues per batch), its patch mask a static input; None,
        with a warning, where that capture failed (the refill then runs eagerly)."""
        mask = x.coordinate_manager.patch_mask.clone()
        latest: list[Optional[MaskSites]] = [None]

        def refill() -> None:
            sites = MaskSites.of(x, mask)
            latest[0] = self._refill(graph, sites)
            for stride in graph.body.out_strides:  # the output maps' sites, refreshed by every replay
                sites.coordinates(stride)

        try:
            refill()  # on the current stream, outside the capture: every op runs once before it
            with capture_guard(x.F.device):
                replay = self.make_refill_graph(refill, x.F.device)
        except RuntimeError as e:
            if cuda_context_lost(x.F.device):
                raise RuntimeError("capturing the neighbour tables' refill as a CUDA graph broke this process's CUDA "
                                   "context, so nothing more can run in it; train with trainer.cuda_graphs=false and "
                                   f"report this error: {type(e).__name__}: {e}") from e
            self._warn("refill", f"capturing the neighbour tables' refill as a CUDA graph failed ({type(e).__name__}: "
                                 f"{e}); refilling them eagerly")
            return None
        if latest[0] is None:  # a table did not fit (warned): cannot happen for the template's own shapes
            return None

        def run() -> Optional[MaskSites]:
            replay()
            return latest[0]

        return _RefillGraph(mask, run)

    def _refill(self, graph: _Graph, sites: MaskSites) -> Optional[MaskSites]:
        """Derive a batch's tables and batch indices from its ``sites`` (its patch mask), in
        the order the template's were built, and copy them into the template's; returns
        ``sites`` (for the output maps), or None (with a warning) where a table cannot take
        them. No MinkowskiEngine map and no host synchronisation: the host goes on to the
        replay while the GPU builds the tables (:mod:`spark_me.ops.mask_sites`)."""
        template: TableCache = graph.template.coordinate_manager
        for cache_key, captured in template.neighbour_tables.items():
            in_stride, (kernel_size, stride) = _in_stride(cache_key), cache_key[2:]
            fresh = sites.tables(in_stride, kernel_size, stride, captured.out_key, complete=captured._complete)
            problem = _copy_tables(fresh, captured)
            if problem:
                return self._mismatch(f"the {kernel_size}x{kernel_size}/{stride} tables at stride {in_stride}: {problem}")
        for map_id, captured in template.batch_indices.items():
            in_stride = _in_stride(map_id)
            if sites.count(in_stride) != len(captured):
                return self._mismatch(f"the batch index at stride {in_stride} has {sites.count(in_stride)} sites, "
                                      f"not {len(captured)}")
            captured.copy_(sites.coordinates(in_stride)[:, 0])
        return sites

    def _plain(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        self.plain_runs += 1
        return self.encoder.forward_gathered(x)

    def _mismatch(self, what: str) -> None:
        self._warn(what, f"this batch runs without its CUDA graph: {what} (differs from the captured batch)")
        return None

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)


def prepare(body: nn.Module, sample: torch.Tensor) -> None:
    """Run ``body`` forward and backward once on ``sample`` on the current stream, so that
    every table, batch index and lazily built table part it reads exists before a capture's
    warm-up (which must build none: see the module docstring). The gradients are taken, not
    accumulated into ``.grad``, and the random state is put back (drop path draws for the
    template batch as for any other)."""
    with torch.random.fork_rng(devices=[sample.device] if sample.is_cuda else []):
        features = sample.detach().requires_grad_(sample.requires_grad)
        outputs = [o for o in body(features) if o.requires_grad]
        inputs = [features] if features.requires_grad else []
        inputs += [p for p in body.parameters() if p.requires_grad]
        if outputs and inputs:
            torch.autograd.grad(outputs, inputs, [torch.zeros_like(o) for o in outputs], allow_unused=True)


def own_gradients(module: nn.Module) -> None:
    """Replace each existing parameter gradient of ``module`` by a copy, so that none of
    them is a graph's static buffer, which the next replay overwrites (module docstring)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p.grad = p.grad.clone()


def cuda_context_lost(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device whose context a sticky error (an illegal memory
    access) has lost: every later CUDA call in the process fails too, so neither an eager
    fallback nor a benchmark's next case can run."""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
    except RuntimeError:
        return True
    return False


def check_graphable(encoder: nn.Module) -> None:
    """Raise ValueError naming the fix unless ``encoder``'s forward can be captured: its
    class says it can (``supports_cuda_graphs``) and no layer runs MinkowskiEngine's
    kernels (they use MinkowskiEngine's own per-batch kernel maps). A dense stem is fine:
    its conv and gathering run before the graph, whose input is their output."""
    name = type(encoder).__name__
    if not getattr(encoder, "supports_cuda_graphs", False):
        raise ValueError(f"{name} does not support CUDA graphs: its forward_sparse (and with a dense stem "
                         "forward_after_stem_conv) must read per-batch data only through the batch's neighbour "
                         "tables and batch indices (spark_me.ops); then set supports_cuda_graphs = True")
    if any(getattr(m, "conv_impl", None) == "minkowski" for m in encoder.modules()):
        raise ValueError("CUDA graphs cannot replay MinkowskiEngine's kernels (conv_impl='minkowski'): use "
                         "conv_impl='auto', 'triton' or 'torch'")


def _gathered_manager(x: ME.SparseTensor) -> TableCache:
    """``x``'s coordinate manager, which must be a batch's :class:`TableCache` that knows
    the batch's extent and patch mask (refilling a graph's tables relies on them)."""
    cm = x.coordinate_manager
    if not isinstance(cm, TableCache) or cm.extent is None or cm.patch_mask is None:
        raise ValueError("CUDA graphs need a batch gathered by the encoder's gather (spark_me.gather.to_sparse "
                         "or conv_to_sparse: a TableCache that knows the batch's extent and patch mask)")
    return cm


def _on_sites(features: tuple[torch.Tensor, ...], strides: list[int], sites: MaskSites,
              x: ME.SparseTensor) -> list[ME.SparseTensor]:
    """Replayed per-scale features (rows in ``sites``' row-major order) as SparseTensors on
    maps of those sites, inserted into the gathered batch's manager in that order (which
    MinkowskiEngine keeps for unique coordinates); the gathered map serves its own stride."""
    cm: TableCache = x.coordinate_manager
    keys = {x.tensor_stride[0]: x.coordinate_map_key}
    for s in strides:
        if s not in keys:
            keys[s], _ = cm.insert_and_map(sites.coordinates(s), tensor_stride=s)
    return [ME.SparseTensor(f, coordinate_map_key=keys[s], coordinate_manager=cm) for f, s in zip(features, strides)]


def _in_stride(map_key: tuple) -> int:
    """The tensor stride of a table cache key or map id (``((s, s), name, ...)``)."""
    return map_key[0][0]


def _copy_tables(fresh: NeighbourTables, captured: NeighbourTables) -> str:
    """Copy every part of ``fresh`` that the captured kernels read into ``captured``'s
    tensors; returns what differs where they cannot take it ('' when copied). Whether
    every site has all its neighbours is the same for every batch of a shape
    (:mod:`spark_me.ops.mask_sites`), so it is not read back here."""
    if (fresh.n_in, fresh.n_out) != (captured.n_in, captured.n_out):
        return f"{fresh.n_in}->{fresh.n_out} sites, captured {captured.n_in}->{captured.n_out}"
    if captured._pairs is not None:
        return "per-tap pair lists (algorithm='pairs') change length with every batch"
    captured.forward.copy_(fresh.forward)
    if captured._dense_grid is not None:
        grid, into = fresh.dense_grid, captured._dense_grid
        if (grid.in_shape, grid.out_shape) != (into.in_shape, into.out_shape):
            return f"dense maps {grid.in_shape}, captured {into.in_shape}"
        into.in_flat.copy_(grid.in_flat)
        into.out_flat.copy_(grid.out_flat)
    if captured._triton_inverse is not None:
        from spark_me.ops.triton_backend import inverse_table

        captured._triton_inverse.copy_(inverse_table(fresh))
    return ""
