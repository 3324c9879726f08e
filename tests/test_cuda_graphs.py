"""CUDA graphs of the sparse encoder (spark_me.cuda_graphs).

On the CPU the "graph" is the captured body itself (``make_graph=_eager``): it runs the
template batch's layers on the template's tables, refilled with each new batch's, so these
tests prove what a replay relies on: every per-batch input of the encoder reaches it
through the refilled tables and batch indices. The capture itself runs on CUDA only.
"""
from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch

from conftest import CUDA_READY, NEEDS_CUDA, HostSyncAudit, randomize_norms, rel_err
from spark_me import build_sparse_encoder
from spark_me.cuda_graphs import MAX_GRAPHS, EncoderGraphs, _Body, make_cuda_graph, prepare
from spark_me.gather import to_dense, to_sparse
from spark_me.masking import random_patch_mask
from spark_me.ops import TableCache, neighbour_tables
from spark_me.ops.mask_sites import MaskSites
from spark_me.recompute import buffers_unchanged


def _eager(body, sample):
    return body


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    """Relative error within ``tol``; an all-zero reference (a block that drop path dropped
    for every sample) must be matched exactly."""
    return torch.equal(got, want) if not want.any() else rel_err(got, want) < tol


def _batch(seed: int, batch: int = 2, size: int = 96, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g, dtype=dtype)
    active = random_patch_mask(batch, (size // 32, size // 32), 0.6, g)
    return images.to(device), active.to(device)


def _encoder(name: str, dtype=torch.float64, device="cpu", conv_impl="torch", **kwargs):
    torch.manual_seed(0)
    encoder = build_sparse_encoder(name, conv_impl=conv_impl, **kwargs)
    randomize_norms(encoder, torch.Generator().manual_seed(1))
    return encoder.to(device=device, dtype=dtype).train()


def _loss(features, batch: int, size: int) -> torch.Tensor:
    """A loss that weighs every site of every scale differently (fixed weights)."""
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for f in features:
        s = f.tensor_stride[0]
        dense = to_dense(f, batch, (size // s, size // s))
        total = total + (dense * torch.randn(dense.shape, generator=g, dtype=dense.dtype).to(dense.device)).sum()
    return total


def _step(encoder, run, images, active, size):
    """Features (dense maps) and every parameter's gradient of one forward+backward."""
    encoder.zero_grad(set_to_none=True)
    features = run(encoder.gather(images, active))
    _loss(features, len(images), size).backward()
    dense = [to_dense(f, len(images), (size // f.tensor_stride[0],) * 2).detach() for f in features]
    return dense, {n: p.grad.clone() for n, p in encoder.named_parameters()}


def _same_steps(graphed, plain, graphs, seeds=range(3)) -> None:
    """Each batch's features and gradients through ``graphs`` equal the plain encoder's."""
    for seed in seeds:
        images, active = _batch(seed)
        got, got_grads = _step(graphed, graphs.forward_gathered, images, active, 96)
        want, want_grads = _step(plain, plain.forward_gathered, images, active, 96)
        assert all(rel_err(g, w) < 1e-12 for g, w in zip(got, want)), seed
        assert all(_close(got_grads[n], want_grads[n], 1e-10) for n in want_grads), seed


@pytest.mark.parametrize("dense_stem", [False, True])
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_refilled_tables_give_every_batch_its_own_features_gradients_and_statistics(name, dense_stem):
    """Drop path on: its per-sample draws reach the sites through the refilled batch index.
    With the dense stem the graph starts at the stem conv's gathered output, and the stem
    conv's weight and bias get their gradients through the graph's input."""
    size = 96
    graphed, plain = (_encoder(name, drop_path_rate=0.3, dense_stem=dense_stem) for _ in range(2))
    graphs = EncoderGraphs(graphed, make_graph=_eager)
    for seed in range(3):  # the first batch is captured, the next two refill its tables
        images, active = _batch(seed, batch=4, size=size)
        torch.manual_seed(seed)
        got, got_grads = _step(graphed, graphs.forward_gathered, images, active, size)
        torch.manual_seed(seed)
        want, want_grads = _step(plain, plain.forward_gathered, images, active, size)
        assert len(got) == len(want) == 4
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-12
        for n in want_grads:
            assert _close(got_grads[n], want_grads[n], 1e-10), n
    assert len(graphs.graphs) == 1 and (graphs.replays, graphs.plain_runs) == (3, 0)  # one shape, one capture
    template = next(iter(graphs.graphs.values())).template
    assert template.tensor_stride[0] == ({"resnet18": 2, "convnext_atto": 4}[name] if dense_stem else 1)
    for (n, a), (_, b) in zip(graphed.named_buffers(), plain.named_buffers()):
        # batch-norm statistics updated once per batch, as plainly (summed in another row order)
        assert torch.equal(a, b) if not a.is_floating_point() else rel_err(a, b) < 1e-12, n


def test_the_template_holds_the_latest_batchs_tables_from_its_mask():
    """A replay's tables and batch indices are the latest batch's, derived from its patch
    mask (row-major sites at every scale), not from MinkowskiEngine's maps."""
    encoder = _encoder("resnet18", drop_path_rate=0.3)
    graphs = EncoderGraphs(encoder, make_graph=_eager)
    for seed in range(2):
        x = to_sparse(*_batch(seed), 32)
        graphs.forward_gathered(x)
    template = next(iter(graphs.graphs.values())).template.coordinate_manager
    sites = MaskSites.of(x)
    assert len(template.neighbour_tables) > 3 and template.batch_indices
    for (stride_pair, _, kernel_size, stride), captured in template.neighbour_tables.items():
        assert torch.equal(captured.forward, sites.tables(stride_pair[0], kernel_size, stride, None).forward)
    for (stride_pair, _), captured in template.batch_indices.items():
        assert torch.equal(captured, sites.coordinates(stride_pair[0])[:, 0].long())


@pytest.mark.parametrize("dense_stem", [False, True])
def test_a_replays_tables_need_no_minkowski_map_and_no_host_read(monkeypatch, dense_stem):
    """Refilling the captured tables for a new batch asks MinkowskiEngine for no map or
    coordinates and makes no op that would read a value back: on a GPU the host goes on
    to the replay while the device builds the tables."""
    encoder = _encoder("convnext_atto", drop_path_rate=0.3, dense_stem=dense_stem)
    graphs = EncoderGraphs(encoder, make_graph=_eager)
    _step(encoder, graphs.forward_gathered, *_batch(0), 96)
    (graph,) = graphs.graphs.values()
    x = encoder.gather(*_batch(1))

    def refuse(*args, **kwargs):
        raise AssertionError("a refill asked MinkowskiEngine for a map or coordinates")

    for method in ("get_coordinates", "stride", "kernel_map"):
        monkeypatch.setattr(TableCache, method, refuse)
    assert graph.refill is not None  # on the CPU its "capture" is the refill itself, on the static mask
    with HostSyncAudit() as audit:
        graph.refill.mask.copy_(x.coordinate_manager.patch_mask)
        captured = graph.refill.run()
        eager = graphs._refill(graph, MaskSites.of(x))
    assert captured is not None and eager is not None
    assert audit.ops == [], list(zip(audit.ops, audit.sources))


def test_a_new_batch_shape_is_captured_again_and_beyond_the_limit_runs_without_a_graph(caplog):
    encoder = _encoder("resnet18")
    graphs = EncoderGraphs(encoder, make_graph=_eager)
    plain = _encoder("resnet18")
    shapes = [(2, 96), (3, 96), (2, 64)][: MAX_GRAPHS + 1]
    for i, (batch, size) in enumerate(shapes):
        images, active = _batch(i, batch=batch, size=size)
        with caplog.at_level(logging.WARNING, logger="spark_me.cuda_graphs"):
            got, _ = _step(encoder, graphs.forward_gathered, images, active, size)
        want, _ = _step(plain, plain.forward_gathered, images, active, size)
        assert all(rel_err(g, w) < 1e-12 for g, w in zip(got, want))
    assert len(graphs.graphs) == MAX_GRAPHS and (graphs.replays, graphs.plain_runs) == (MAX_GRAPHS, 1)
    assert f"more than {MAX_GRAPHS} batch shapes" in caplog.text and "runs without a CUDA graph" in caplog.text


def test_tables_a_replay_cannot_refill_send_the_batch_down_the_plain_path(caplog):
    encoder = _encoder("resnet18")
    graphs = EncoderGraphs(encoder, make_graph=_eager)
    graphs.forward_gathered(to_sparse(*_batch(0), 32))
    template = next(iter(graphs.graphs.values())).template.coordinate_manager
    next(iter(template.neighbour_tables.values())).pairs  # as algorithm="pairs" would build them
    plain = _encoder("resnet18")
    images, active = _batch(1)
    with caplog.at_level(logging.WARNING, logger="spark_me.cuda_graphs"):
        got, _ = _step(encoder, graphs.forward_gathered, images, active, 96)
    want, _ = _step(plain, plain.forward_gathered, images, active, 96)
    assert all(rel_err(g, w) < 1e-12 for g, w in zip(got, want))
    assert "runs without its CUDA graph" in caplog.text and "algorithm='pairs'" in caplog.text
    assert (graphs.replays, graphs.plain_runs) == (1, 1)


def test_a_failed_capture_warns_once_and_trains_on_without_graphs(caplog):
    def broken(body, sample):
        raise RuntimeError("operation not permitted when stream is capturing")

    encoder, plain = _encoder("resnet18"), _encoder("resnet18")
    graphs = EncoderGraphs(encoder, make_graph=broken)
    with caplog.at_level(logging.WARNING, logger="spark_me.cuda_graphs"):
        for seed in range(2):
            images, active = _batch(seed)
            got, _ = _step(encoder, graphs.forward_gathered, images, active, 96)
            want, _ = _step(plain, plain.forward_gathered, images, active, 96)
            assert all(rel_err(g, w) < 1e-12 for g, w in zip(got, want))
    assert caplog.text.count("capturing the encoder as a CUDA graph failed") == 1
    assert (graphs.replays, graphs.plain_runs) == (0, 2)


def test_a_failed_refill_capture_warns_once_and_refills_eagerly(caplog):
    """Where the tables' refill cannot be captured, replays refill them eagerly: the same
    results, one warning."""
    def broken(refill, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed, plain = _encoder("convnext_atto"), _encoder("convnext_atto")
    graphs = EncoderGraphs(graphed, make_graph=_eager, make_refill_graph=broken)
    with caplog.at_level(logging.WARNING, logger="spark_me.cuda_graphs"):
        _same_steps(graphed, plain, graphs)
    assert caplog.text.count("capturing the neighbour tables' refill as a CUDA graph failed") == 1
    assert next(iter(graphs.graphs.values())).refill is None and (graphs.replays, graphs.plain_runs) == (3, 0)


@pytest.mark.parametrize("fails", [False, True])
def test_the_capture_runs_with_the_garbage_collector_paused(fails):
    """Garbage from before the capture is collected first, none during it (a collection
    there could tear down an earlier model's CUDA objects inside the capture), and the
    collector runs again afterwards, whether the capture worked or failed."""

    class Cycle:
        pass

    garbage = Cycle()
    garbage.itself = garbage
    gone = weakref.ref(garbage)
    del garbage
    seen = []

    def capture(body, sample):
        seen.append((gc.isenabled(), gone() is None))
        if fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        return body

    assert gc.isenabled()
    encoder = _encoder("resnet18")
    graphs = EncoderGraphs(encoder, make_graph=capture)
    images, active = _batch(0)
    _step(encoder, graphs.forward_gathered, images, active, 96)
    assert seen == [(False, True)]
    assert gc.isenabled()
    assert (graphs.replays, graphs.plain_runs) == ((0, 1) if fails else (1, 0))


@pytest.mark.parametrize("dense_stem", [False, True])
def test_a_graph_captured_ahead_replays_every_batch_of_its_shape(dense_stem):
    """The trainer captures on zero images under a mask of its own before the loader
    starts: that leaves parameters, gradients and buffers alone, keeps no autograd
    history of the template (a dense stem's conv input), and every training batch of the
    shape, the first included, is replayed with the plain encoder's results."""
    graphed, plain = _encoder("resnet18", dense_stem=dense_stem), _encoder("resnet18", dense_stem=dense_stem)
    graphs = EncoderGraphs(graphed, make_graph=_eager)
    buffers = {n: b.clone() for n, b in graphed.named_buffers()}
    images, active = _batch(99)
    assert graphs.capture(graphed.gather(torch.zeros_like(images), active))
    assert all(torch.equal(b, buffers[n]) for n, b in graphed.named_buffers())
    assert all(p.grad is None for p in graphed.parameters())
    (graph,) = graphs.graphs.values()
    assert graph.template.F.grad_fn is None
    assert graphs.capture(graphed.gather(images, active))  # the shape is there: nothing more captured
    assert len(graphs.graphs) == 1 and (graphs.replays, graphs.plain_runs) == (0, 0)
    _same_steps(graphed, plain, graphs)
    assert (graphs.replays, graphs.plain_runs) == (3, 0)
    for (n, a), (_, b) in zip(graphed.named_buffers(), plain.named_buffers()):
        assert torch.equal(a, b) if not a.is_floating_point() else rel_err(a, b) < 1e-12, n


def test_capturing_ahead_needs_graphs_on_and_a_cuda_training_batch():
    encoder = _encoder("resnet18")
    images, active = _batch(0)
    with pytest.raises(ValueError, match="set_cuda_graphs"):
        encoder.capture_cuda_graph(images, active)
    encoder.set_cuda_graphs()
    with pytest.raises(ValueError, match="CUDA images, the encoder in train"):
        encoder.capture_cuda_graph(images, active)


def test_encoders_that_cannot_be_replayed_refuse_naming_the_fix():
    with pytest.raises(ValueError, match="cannot replay MinkowskiEngine's kernels"):
        build_sparse_encoder("resnet18", conv_impl="minkowski").set_cuda_graphs()

    from spark_me.encoders.base import SparseEncoder

    class Own(SparseEncoder):
        feature_channels = [8]

    with pytest.raises(ValueError, match="Own does not support CUDA graphs.*supports_cuda_graphs = True"):
        Own().set_cuda_graphs()


def test_switching_the_stem_drops_the_captured_graphs():
    """A graph captured from one stem's output cannot take the other's: switching the stem
    either way leaves the encoder to capture again on its next training batch."""
    encoder = _encoder("resnet18")
    encoder.set_cuda_graphs()
    for dense_stem in (True, False):
        encoder.encoder_graphs = EncoderGraphs(encoder, make_graph=_eager)
        encoder.set_dense_stem(dense_stem)
        assert encoder.cuda_graphs and encoder.encoder_graphs is None


def test_evaluation_and_cpu_batches_run_the_plain_path():
    encoder = _encoder("resnet18")
    encoder.set_cuda_graphs()
    images, active = _batch(0)
    encoder(images, active)  # a CPU batch: no graphs made
    assert encoder.encoder_graphs is None


def _table_state(cm) -> tuple:
    """Everything built on a batch's manager: its tables, each table's parts, its batch indices."""
    return (tuple((k, len(t.tensors()), t._complete) for k, t in cm.neighbour_tables.items()),
            tuple(cm.batch_indices))


@pytest.mark.parametrize("name, dense_stem", [("resnet18", False), ("convnext_atto", False), ("resnet18", True)])
def test_the_capture_warm_up_builds_no_table(name, dense_stem):
    """A capture's warm-up runs on a side stream, where MinkowskiEngine's maps race with
    their readers (an illegal memory access on an H100): the template is prepared first,
    so the warm-up runs (forward and backward, as make_graphed_callables does them, drop
    path and recomputation on) find every table, table part and batch index built."""
    built_during_warm_up = []

    def warm_up(body, samples):
        (sample,) = samples
        before = _table_state(body.manager)
        for _ in range(3):
            features = sample.detach().requires_grad_(sample.requires_grad)
            outputs = body(features)
            torch.autograd.grad(outputs, list(body.parameters()), [torch.ones_like(o) for o in outputs],
                                allow_unused=True)
        built_during_warm_up.append(_table_state(body.manager) != before)
        return body

    encoder = _encoder(name, drop_path_rate=0.3, dense_stem=dense_stem)
    encoder.set_grad_checkpointing(True)
    graphs = EncoderGraphs(encoder, make_graph=warm_up)
    images, active = _batch(0, batch=4)
    _step(encoder, graphs.forward_gathered, images, active, 96)
    assert built_during_warm_up == [False] and (graphs.replays, graphs.plain_runs) == (1, 0)
    assert all(p.grad is not None for p in encoder.parameters())  # the template's own step, once


def test_preparing_the_template_leaves_gradients_and_statistics_alone():
    """The preparing run takes its gradients without accumulating them; the capture's
    buffers_unchanged puts back the statistics it moved."""
    encoder = _encoder("resnet18")
    x = to_sparse(*_batch(0), 32)
    body = _Body(encoder, x)
    buffers = [b.clone() for b in encoder.buffers()]
    with buffers_unchanged(encoder):
        prepare(body, x.F)
        assert not all(torch.equal(a, b) for a, b in zip(buffers, encoder.buffers()))  # it did run in training mode
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, encoder.buffers()))
    assert len(x.coordinate_manager.neighbour_tables) > 3


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and MinkowskiEngine built with CUDA")
def test_tables_refuse_to_build_on_a_side_stream():
    """MinkowskiEngine's coordinate kernels run on the default stream whatever stream is
    current: building maps or tables under another one must fail, not race."""
    images, active = _batch(0, dtype=torch.float32, device="cuda")
    x = to_sparse(images, active, 32)
    with torch.cuda.stream(torch.cuda.Stream()):
        with pytest.raises(RuntimeError, match="default CUDA stream"):
            to_sparse(images, active, 32)
        with pytest.raises(RuntimeError, match="default CUDA stream"):
            neighbour_tables(x, 3, 2)
    assert neighbour_tables(x, 3, 2).n_out > 0  # fine back on the default stream


class _SyncsWhenCaptured(torch.nn.Module):
    """The captured body, reading a value back to the host when (and only when) its
    stream is capturing: a real capture that fails the way the sixth GPU run's did."""

    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, features: torch.Tensor):
        outputs = self.body(features)
        if torch.cuda.is_current_stream_capturing():
            outputs[0].sum().item()
        return outputs


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and MinkowskiEngine built with CUDA")
def test_a_failed_cuda_capture_puts_the_default_stream_back_and_trains_on(caplog):
    """After a real capture fails, the batch and the ones after it run the plain encoder
    on the default stream (the sixth GPU run left the capture's side stream current, and
    every later batch refused to build its maps there), with the plain run's results."""
    device, size, batch = torch.device("cuda"), 96, 4
    graphed, plain = (_encoder("resnet18", torch.float32, device, "triton") for _ in range(2))
    graphs = EncoderGraphs(graphed, make_graph=lambda body, sample: make_cuda_graph(_SyncsWhenCaptured(body), sample))
    with caplog.at_level(logging.WARNING, logger="spark_me.cuda_graphs"):
        for seed in range(3):
            images, active = _batch(seed, batch=batch, size=size, dtype=torch.float32, device=device)
            got, got_grads = _step(graphed, graphs.forward_gathered, images, active, size)
            assert torch.cuda.current_stream(device) == torch.cuda.default_stream(device)
            want, want_grads = _step(plain, plain.forward_gathered, images, active, size)
            assert all(_close(g, w, 1e-4) for g, w in zip(got, want)), seed
            assert all(_close(got_grads[n], want_grads[n], 1e-3) for n in want_grads), seed
    assert caplog.text.count("capturing the encoder as a CUDA graph failed") == 1
    assert (graphs.replays, graphs.plain_runs) == (0, 3)
    torch.cuda.synchronize(device)  # the context survived


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and MinkowskiEngine built with CUDA")
def test_a_capture_after_a_dropped_graphed_encoder_replays_every_batch():
    """The sixth GPU run's sequence: a graphed encoder is dropped (garbage in a reference
    cycle with its graphs, left to the cyclic collector), then another one is captured;
    it must replay every batch, not fall back. (Whether a collection would have come
    inside the capture is up to the collector; the CPU test checks that none can.)"""
    device, size, batch = torch.device("cuda"), 96, 4
    images, active = _batch(0, batch=batch, size=size, dtype=torch.float32, device=device)
    first = _encoder("resnet18", torch.float32, device, "triton")
    first.set_cuda_graphs()
    _loss(first(images, active), batch, size).backward()
    assert first.encoder_graphs.replays == 1
    del first
    second = _encoder("convnext_atto", torch.float32, device, "triton")
    second.set_cuda_graphs()
    for seed in range(2):
        images, active = _batch(seed, batch=batch, size=size, dtype=torch.float32, device=device)
        _loss(second(images, active), batch, size).backward()
    assert (second.encoder_graphs.replays, second.encoder_graphs.plain_runs) == (2, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and MinkowskiEngine built with CUDA")
def test_a_cuda_graph_captured_ahead_under_bf16_replays_the_training_batches():
    """As the trainer does it: capture on zero images under the step's autocast, then
    train; every batch is replayed and as close to float32 as the plain bf16 run is."""
    device, size, batch = torch.device("cuda"), 96, 4
    graphed, plain, exact = (_encoder("convnext_atto", torch.float32, device, "triton") for _ in range(3))
    graphed.set_cuda_graphs()
    images, active = _batch(99, batch=batch, size=size, dtype=torch.float32, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert graphed.capture_cuda_graph(torch.zeros_like(images), active)

    def step(e, low_precision):
        e.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low_precision):
            loss = _loss(e(images, active), batch, size).float()
        loss.backward()
        return [p.grad.float().clone() for p in e.parameters()]

    for seed in range(3):
        images, active = _batch(seed, batch=batch, size=size, dtype=torch.float32, device=device)
        got, want, truth = step(graphed, True), step(plain, True), step(exact, False)
        for i, (g, w, t) in enumerate(zip(got, want, truth)):
            if t.any():
                assert rel_err(g, t) <= 2 * rel_err(w, t) + 1e-3, (seed, i, rel_err(g, t), rel_err(w, t))
    assert (graphed.encoder_graphs.replays, graphed.encoder_graphs.plain_runs) == (3, 0)


def _static_gradient_graph(body, samples):
    """``make_graphed_callables``' convention, eagerly on the CPU: every call returns its
    parameter gradients in the same buffers, which the next call's backward overwrites."""
    params = [p for p in body.parameters() if p.requires_grad]
    static = [torch.zeros_like(p) for p in params]

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, features, *weights):
            with torch.enable_grad():
                ctx.outputs = body(features.detach())
            return tuple(o.detach() for o in ctx.outputs)

        @staticmethod
        def backward(ctx, *grads):
            new = torch.autograd.grad(ctx.outputs, params, grads, allow_unused=True)
            for buffer, g in zip(static, new):
                buffer.copy_(g if g is not None else torch.zeros_like(buffer))
            return (None, *(b.detach() for b in static))

    return lambda features: Replay.apply(features, *params)


def test_accumulated_gradients_survive_the_graphs_static_gradient_buffers():
    """Two micro-batches' gradients accumulated into .grad (trainer.grad_accum_steps=2):
    autograd keeps the first backward's static buffer as .grad, and the second replay
    overwrites that buffer before adding to it, unless the replay first copies .grad out."""
    graphed, plain = _encoder("resnet18"), _encoder("resnet18")
    graphs = EncoderGraphs(graphed, make_graph=_static_gradient_graph)
    for e in (graphed, plain):
        e.zero_grad(set_to_none=True)
    for step in range(2):  # the first micro-batch is captured, the second replayed
        images, active = _batch(step, batch=2)
        for e, run in ((graphed, graphs.forward_gathered), (plain, plain.forward_gathered)):
            _loss(run(to_sparse(images, active, 32)), 2, 96).backward()
    assert (graphs.replays, graphs.plain_runs) == (2, 0)
    for (n, a), (_, b) in zip(graphed.named_parameters(), plain.named_parameters()):
        assert rel_err(a.grad, b.grad) < 1e-12, n


@pytest.mark.parametrize("amp", [None, "bf16"])
@pytest.mark.parametrize("name, conv_impl, dense_stem", [pytest.param("resnet18", "triton", False, marks=NEEDS_CUDA),
                                                         pytest.param("convnext_atto", "torch", False, marks=NEEDS_CUDA),
                                                         pytest.param("resnet18", "triton", True, marks=NEEDS_CUDA),
                                                         pytest.param("convnext_atto", "triton", True, marks=NEEDS_CUDA)])
def test_cuda_graph_replays_equal_the_plain_encoder(name, conv_impl, dense_stem, amp):
    """The real capture: five batches (the first one captured) through the encoder's own
    forward+backward, against the same encoder run plainly, and against it in float32.
    With the dense stem the graph's input is the stem conv's gathered output, and the stem
    conv's gradients come through the graph's input gradient.

    In float32 the two runs share every kernel, so only the order of fp32 atomic adds
    differs (a wrong table would be off by O(1)). In bf16 one rounding flip from that order
    grows through the layers (a graphed ResNet-18 was 1.5e-2 from the plain one at its last
    stage on an H100), so there the graphed run must be as close to float32 as the plain
    bf16 run is. (Drop path is off: a replay draws from PyTorch's graph-safe generator,
    whose offsets need not follow the plain run's; the CPU tests cover its batch index.)"""
    device, size, batch = torch.device("cuda"), 96, 4
    graphed, plain, exact = (_encoder(name, torch.float32, device, conv_impl, dense_stem=dense_stem) for _ in range(3))
    graphed.set_cuda_graphs()

    def step(e, low_precision):
        e.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low_precision):
            features = e(images, active)
            loss = _loss(features, batch, size).float()
        loss.backward()
        return ([to_dense(f, batch, (size // f.tensor_stride[0],) * 2).float().detach() for f in features]
                + [p.grad.float().clone() for p in e.parameters()])

    for seed in range(5):
        images, active = _batch(seed, batch=batch, size=size, dtype=torch.float32, device=device)
        got, want = step(graphed, amp == "bf16"), step(plain, amp == "bf16")
        if amp is None:
            for i, (g, w) in enumerate(zip(got, want)):
                assert _close(g, w, 1e-3), (seed, i, rel_err(g, w))
        else:
            truth = step(exact, False)
            for i, (g, w, t) in enumerate(zip(got, want, truth)):
                if t.any():
                    assert rel_err(g, t) <= 2 * rel_err(w, t) + 1e-3, (seed, i, rel_err(g, t), rel_err(w, t))
    graphs = graphed.encoder_graphs
    assert graphs is not None and len(graphs.graphs) == 1 and (graphs.replays, graphs.plain_runs) == (5, 0)
    assert next(iter(graphs.graphs.values())).refill is not None  # the tables' refill was captured too
    # batch-norm statistics, updated once per batch: as the plain run's, by the same bounds
    for (n, a), (_, b), (_, t) in zip(graphed.named_buffers(), plain.named_buffers(), exact.named_buffers()):
        if not a.is_floating_point():
            assert torch.equal(a, b), n
        elif amp is None:
            assert rel_err(a, b) < 1e-3, n
        else:
            assert rel_err(a, t) <= 2 * rel_err(b, t) + 1e-3, (n, rel_err(a, t), rel_err(b, t))


@pytest.mark.parametrize("name, conv_impl", [pytest.param("resnet18", "triton", marks=NEEDS_CUDA)])
def test_cuda_graph_gradients_accumulate_over_micro_batches(name, conv_impl):
    """The real capture's parameter gradients are static buffers (see
    test_accumulated_gradients_survive_the_graphs_static_gradient_buffers): three float32
    micro-batches accumulated into .grad equal the plain encoder's sum, within the order
    of atomic adds."""
    device, size, batch = torch.device("cuda"), 96, 4
    graphed, plain = (_encoder(name, torch.float32, device, conv_impl) for _ in range(2))
    graphed.set_cuda_graphs()
    for e in (graphed, plain):
        e.zero_grad(set_to_none=True)
    for seed in range(3):
        images, active = _batch(seed, batch=batch, size=size, dtype=torch.float32, device=device)
        for e in (graphed, plain):
            _loss(e(images, active), batch, size).backward()
    assert graphed.encoder_graphs.replays == 3 and graphed.encoder_graphs.plain_runs == 0
    for (n, a), (_, b) in zip(graphed.named_parameters(), plain.named_parameters()):
        assert _close(a.grad, b.grad, 1e-3), (n, rel_err(a.grad, b.grad))
