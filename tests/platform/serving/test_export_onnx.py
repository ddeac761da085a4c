"""ONNX export: one graph, exported at one size, runs at others with onnxruntime and matches PyTorch.

Each model is exported once per module (with post-processing and the encoder anchors as an extra
output, which the tie-robust alignment below needs) and run at three sizes it was not exported at:
a larger one, one that is not a multiple of 32, and a padded batch of two different-size images.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dino_core
import dino_core.transformer as transformer_module
from dino_core.export import ExportError, check_exportable, export_onnx
from support.parity import load_fixture, official_state_dict

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# (export size, run sizes); a run size is one (h, w) per image, padded together into one batch
CASES = {
    "dino_tiny": ((200, 232), [[(256, 288)], [(203, 251)], [(192, 240), (230, 205)]]),
    "dino_r50_4scale": ((232, 264), [[(256, 256)], [(237, 301)], [(224, 250), (260, 229)]]),
}


def _model(name):
    torch.manual_seed(0)
    if name == "dino_tiny":
        model, _, post = dino_core.build_model("dino_tiny", num_classes=11)
    else:  # the parity fixture's deterministic fill weights
        model, _, post = dino_core.build_model("dino_r50_4scale", num_classes=91)
        dino_core.load_official_state_dict(model, {"model": official_state_dict(load_fixture("r50_4scale"))})
    return model.eval(), post


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    name = request.param
    model, post = _model(name)
    (height, width), _ = CASES[name]
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / f"{name}.onnx", height, width,
                       with_postprocess=True, with_anchors=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return SimpleNamespace(name=name, model=model, post=post, path=path, session=session, size=(height, width))


def _batch(sizes, seed=0):
    """Images of ``sizes`` zero-padded into one batch, with the padding mask and their sizes."""
    g = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    return images, mask, torch.tensor(sizes, dtype=torch.int64)


def _eager(model, images, mask, forced_topk=None):
    """PyTorch eval outputs (reference MSDeformAttn), with the encoder's proposal scores and logits.

    ``forced_topk [B, nq]``: use this selection instead of the model's own top-k (see _align).
    """
    captured = {}
    original_select, original_proposals = transformer_module.select_topk_proposals, transformer_module.encoder_proposals

    def select(class_logits, k):
        captured["scores"] = class_logits.max(-1)[0]
        return original_select(class_logits, k) if forced_topk is None else forced_topk

    def proposals(*args, **kwargs):
        memory, props = original_proposals(*args, **kwargs)
        captured["proposals"] = props.sigmoid()
        return memory, props

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setenv("DINO_MSDA_IMPL", "pytorch")
        mp.setattr(transformer_module, "select_topk_proposals", select)
        mp.setattr(transformer_module, "encoder_proposals", proposals)
        out = model(images, mask)
    return out, captured


def _align(model, images, mask, anchors):
    """Eager outputs computed with the ONNX graph's own top-k selection of encoder proposals.

    The top-k order among (nearly) tied proposal scores is not defined: float rounding that differs
    by 1e-6 between the two runtimes may swap two anchors, which re-pairs them with other content
    queries. So the ONNX selection is recovered from its anchors, checked to be a valid top-k of the
    eager scores (same scores up to 1e-4, in order), and the eager model is re-run with it.
    Returns (eager outputs, number of positions whose selection differed).
    """
    out, captured = _eager(model, images, mask)
    eager_anchors = out["interm_outputs_for_matching_pre"]["pred_boxes"]
    anchors = torch.from_numpy(anchors)
    same = (anchors - eager_anchors).abs().amax(-1) <= 1e-5  # [B, nq]
    if bool(same.all()):
        return out, 0
    scores, proposals = captured["scores"], captured["proposals"]
    k = anchors.shape[1]
    eager_index = torch.topk(scores, k, dim=1)[1]
    forced = eager_index.clone()
    for b in range(anchors.shape[0]):
        for q in torch.nonzero(~same[b]).flatten().tolist():
            distance = (proposals[b] - anchors[b, q]).abs().amax(-1)
            forced[b, q] = int(distance.argmin())
            assert float(distance.min()) <= 1e-5, "an ONNX anchor is no encoder proposal"
        top = torch.topk(scores[b], k).values
        assert torch.allclose(scores[b, forced[b]], top, atol=1e-4), "the ONNX selection is not a top-k"
    out, _ = _eager(model, images, mask, forced_topk=forced)
    return out, int((~same).sum())


def _match_detections(mine, theirs, boundary_eps=1e-4, box_tol=1e-2):
    """Two images' detections (scores, labels, boxes) are the same multiset within tolerance.

    Detections scoring within ``boundary_eps`` of the lowest kept score may differ (ties at the
    top-k cut-off); every other one must have a partner with the same label, score (1e-4) and box
    (``box_tol`` pixels).
    """
    from scipy.optimize import linear_sum_assignment

    s1, l1, b1 = (np.asarray(x) for x in mine)
    s2, l2, b2 = (np.asarray(x) for x in theirs)
    assert s1.shape == s2.shape
    cost = np.abs(s1[:, None] - s2[None]) + np.abs(b1[:, None] - b2[None]).max(-1) / 100
    cost = cost + 1e3 * (l1[:, None] != l2[None])
    rows, cols = linear_sum_assignment(cost)
    cut = max(s1.min(), s2.min()) + boundary_eps
    for r, c in zip(rows, cols):
        if s1[r] <= cut and s2[c] <= cut:
            continue
        assert l1[r] == l2[c], (r, c, l1[r], l2[c])
        assert abs(s1[r] - s2[c]) <= 1e-4 and np.abs(b1[r] - b2[c]).max() <= box_tol, (s1[r], s2[c], b1[r], b2[c])


@pytest.mark.slow
def test_graph_runs_at_other_sizes_and_matches_pytorch(exported):
    """Setup (export) + call at load average ~50 on 2 cores: dino_tiny 39 s + 21 s; dino_r50_4scale (fill
    weights) 489 s + 403 s. On a quiet 2-core machine the tiny export took ~40 s in all."""
    _, runs = CASES[exported.name]
    for sizes in runs:
        images, mask, target_sizes = _batch(sizes)
        logits, boxes, scores, labels, pixel_boxes, anchors = exported.session.run(
            None, {"images": images.numpy(), "mask": mask.numpy(), "target_sizes": target_sizes.numpy()})
        out, moved = _align(exported.model, images, mask, anchors)
        assert moved <= 0.02 * anchors.size // 4 + 2, f"{sizes}: {moved} anchors moved"
        logit_err = np.abs(logits - out["pred_logits"].numpy()).max()
        box_err = np.abs(boxes - out["pred_boxes"].numpy()).max()
        assert logit_err <= 1e-3 and box_err <= 1e-4, (sizes, logit_err, box_err)
        # post-processed detections, as a multiset (the top-k order among tied scores is not defined)
        reference = exported.post(out, target_sizes)
        for b, ref in enumerate(reference):
            _match_detections((scores[b], labels[b], pixel_boxes[b]),
                              (ref["scores"].numpy(), ref["labels"].numpy(), ref["boxes"].numpy()))


def _export_shaped_numbers(model, height, width):
    """Numbers that only a graph frozen at ``height x width`` would hold: sides, level sizes, token counts."""
    strides = list(model.backbone.body.strides)
    strides += [strides[-1] * 2 ** (i + 1) for i in range(model.num_feature_levels - len(strides))]
    levels = []
    h, w = height, width
    for s in strides:
        h, w = -(-height // s), -(-width // s)
        levels.append((h, w))
    numbers = {height, width, sum(h * w for h, w in levels), levels[0][0] * levels[0][1]}
    return numbers, levels


@pytest.mark.slow
def test_graph_is_valid_and_holds_no_constant_shaped_by_the_export_size(exported):
    """Reuses the module's export; ~2 s."""
    graph = onnx.load(str(exported.path))
    onnx.checker.check_model(graph, full_check=True)
    numbers, levels = _export_shaped_numbers(exported.model, *exported.size)
    assert not numbers & {64, 256, 100, 900, 11, 91, 2048}, "pick an export size whose numbers stand out"
    constants = [(init.name, onnx.numpy_helper.to_array(init)) for init in graph.graph.initializer]
    for node in graph.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    constants.append((node.output[0], onnx.numpy_helper.to_array(attr.t)))
    for name, value in constants:
        assert not set(value.shape) & numbers, f"constant {name} has shape {value.shape} (export size {exported.size})"
        if value.dtype.kind in "iu" and value.size <= 16:
            assert not set(value.flatten().tolist()) & numbers, f"constant {name} = {value} (export size {exported.size})"
            assert not any(tuple(value.flatten().tolist()[i:i + 2]) in levels for i in range(value.size - 1)), \
                f"constant {name} = {value} holds a level size of the export"
    # dynamic axes as declared
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert inputs["images"] == ["batch", 3, "height", "width"] and inputs["mask"] == ["batch", "height", "width"]


def test_export_forms_of_the_level_loops_are_bit_identical(monkeypatch):
    """The in-graph forms of the encoder reference points and proposals equal the eager loops exactly."""
    import dino_core.query_selection as qs

    shapes = [(13, 17), (7, 9), (4, 5)]
    masks = []
    for h, w in shapes:
        m = torch.zeros(2, h, w, dtype=torch.bool)
        m[1, h // 2 + 1:] = True
        m[1, :, w - 2:] = True
        masks.append(m)
    spatial_shapes = torch.tensor(shapes)
    flat_mask = torch.cat([m.flatten(1) for m in masks], 1)
    ratios = torch.stack([transformer_module.DeformableTransformer.valid_ratio(m) for m in masks], 1)
    memory = torch.randn(2, flat_mask.shape[1], 8)
    eager = qs.encoder_proposals(memory, flat_mask, spatial_shapes)
    eager_points = transformer_module.DeformableEncoder.reference_points(spatial_shapes, ratios, flat_mask.shape[1])
    monkeypatch.setattr(qs, "is_exporting", lambda: True)
    monkeypatch.setattr(transformer_module, "is_exporting", lambda: True)
    graph = qs.encoder_proposals(memory, flat_mask, spatial_shapes)
    graph_points = transformer_module.DeformableEncoder.reference_points(spatial_shapes, ratios, flat_mask.shape[1])
    assert torch.equal(eager[0], graph[0]) and torch.equal(eager[1], graph[1])
    assert torch.equal(eager_points, graph_points)


def test_gather_form_of_msdeformattn_matches_the_reference():
    from dino_core.ops import ms_deform_attn_gather, ms_deform_attn_reference

    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[13, 17], [7, 9], [4, 5]])
    sizes = shapes.prod(1)
    starts = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    value = torch.randn(2, int(sizes.sum()), 4, 8, generator=g)
    locations = torch.rand(2, 11, 4, 3, 4, 2, generator=g) * 1.2 - 0.1  # some outside the map: zeros
    weights = torch.rand(2, 11, 4, 3, 4, generator=g).softmax(-1)
    reference = ms_deform_attn_reference(value, shapes, starts, locations, weights)
    gathered = ms_deform_attn_gather(value, shapes, starts, locations, weights)
    assert (reference - gathered).abs().max() <= 1e-5


def test_swin_and_bad_requests_are_refused_with_a_reason():
    with pytest.raises(ExportError, match="Swin.*window"):
        check_exportable(SimpleNamespace(config=dino_core.get_config("dino_swinl_4scale")))
    model, _ = _model("dino_tiny")
    with pytest.raises(ExportError, match="opset"):
        export_onnx(model, "/nonexistent/x.onnx", opset=15)
    with pytest.raises(ExportError, match="must be >= "):
        export_onnx(model, "/nonexistent/x.onnx", height=32, width=512)


@pytest.mark.slow
def test_register_export_and_dino_predict_onnx_draw_what_pytorch_draws(tmp_path, monkeypatch):
    """register.export: [onnx] attaches model/model.onnx to the version; `dino predict --onnx` on it
    writes the same detections as `dino predict --model` (dino_tiny, real SQLite MLflow). 250 s on
    2 cores at load average ~50 (mostly the export, ~40 s on a quiet machine)."""
    from mlflow import MlflowClient
    from PIL import Image

    from dino_platform.cli import main
    from dino_platform.data.synth import SynthConfig, generate
    from dino_platform.model.artifact import load_artifact, write_artifact
    from dino_platform.model.config import ModelConfig
    from dino_platform.pipeline.stages.register import RegisterStage, _attach_export
    from dino_platform.registry.models import register_evaluated
    from dino_platform.typed_config import parse_section

    assert parse_section(RegisterStage, {"evaluation": "evaluate", "export": ["onnx"]}, "stages.register").export == ["onnx"]
    with pytest.raises(Exception, match="stages.register.export"):
        parse_section(RegisterStage, {"evaluation": "evaluate", "export": ["tflite"]}, "stages.register")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("test", artifact_location=(tmp_path / "artifacts").as_uri())
    torch.manual_seed(0)
    model, _, _ = dino_core.build_model("dino_tiny", num_classes=91)
    checkpoint = tmp_path / "ckpt"
    write_artifact(checkpoint, dino_core.export_official_state_dict(model), ModelConfig("dino_tiny", 91),
                   {"scale": 0.2}, {1: "person", 3: "car"}, source=str(checkpoint))
    run = client.create_run(experiment).info.run_id
    registration = register_evaluated(uri, "dino-coco", "champion", run, load_artifact(str(checkpoint)),
                                      {"AP": 0.1, "AP50": 0.2}, {})
    ctx = SimpleNamespace(tracking_uri=uri)
    attached = _attach_export(ctx, registration, run, "onnx")
    assert attached == f"runs:/{run}/model/model.onnx"
    assert client.get_model_version("dino-coco", registration.version).tags["export.onnx"] == attached
    assert _attach_export(ctx, registration, run, "onnx") == attached  # once: not exported again
    files = {Path(f.path).name for f in client.list_artifacts(run, "model")}
    assert {"model.pt", "model_config.json", "model.onnx"} <= files

    import mlflow.artifacts

    onnx_file = mlflow.artifacts.download_artifacts(attached, dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    generate(SynthConfig(kind="coco", images=2, seed=3, size=(160, 120)), str(tmp_path / "raw"))
    images = sorted(str(p) for p in (tmp_path / "raw" / "images").rglob("*.jpg"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DINO_MSDA_IMPL", "pytorch")
    common = [*images, "--threshold", "0.0", "--max-detections", "10"]
    assert main(["predict", "--onnx", onnx_file, *common, "--out", str(tmp_path / "onnx")]) == 0
    assert main(["predict", "--model", "models:/dino-coco@champion", *common, "--out", str(tmp_path / "torch")]) == 0
    from_onnx = json.loads((tmp_path / "onnx" / "detections.json").read_text())
    from_torch = json.loads((tmp_path / "torch" / "detections.json").read_text())
    # the export names the version it was made from; the PyTorch run the alias it was given
    assert (from_onnx["model"], from_torch["model"]) == (registration.version_uri, "models:/dino-coco@champion")
    for a, b in zip(from_onnx["images"], from_torch["images"]):
        assert (a["file"], a["width"], a["height"]) == (b["file"], b["width"], b["height"])
        _match_detections(([d["score"] for d in a["detections"]], [d["label"] for d in a["detections"]],
                           [d["box"] for d in a["detections"]]),
                          ([d["score"] for d in b["detections"]], [d["label"] for d in b["detections"]],
                           [d["box"] for d in b["detections"]]), box_tol=0.011)  # JSON rounds to 0.01 px
        assert {d["name"] for d in a["detections"]} == {d["name"] for d in b["detections"]}
        assert Image.open(a["png"]).size == Image.open(b["png"]).size
    # a file that `dino export` did not write is one clear line
    (tmp_path / "other.onnx").write_bytes(b"not a model")
    assert main(["predict", "--onnx", str(tmp_path / "other.onnx"), images[0]]) == 2
