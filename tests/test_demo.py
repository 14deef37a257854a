"""Demo pictures: sizes, formats, content that depends on the predictions, log lines,
curves, clear errors before any model is built, and the README's demo commands run as
written on checkpoints trained here."""
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from instunique.data.synthetic.shapes import register_shapes
from instunique.transforms import AffineWarp
from instunique.visualization import (
    caption_height,
    compose_row,
    curve_keys,
    curves_figure,
    draw_outputs,
    equivariance_row,
    load_metrics,
    query_response,
    render_query_response,
    warp_outputs,
)

from utils import ROOT, get_config, tiny_opts


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load("instunique_demo_cli", os.path.join(ROOT, "demo", "demo.py"))
plot_curves_cli = _load("instunique_plot_curves_cli", os.path.join(ROOT, "tools", "plot_curves.py"))
from predictor import Predictor  # noqa: E402  (demo.py put demo/ on sys.path)

sys.path.insert(0, ROOT)
import train_net  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "shapes", "instunique_mask2former_shapes.yaml")
DATASET = "demotest_val"
SIZE = 120  # the smallest shapes image; the model runs at 64 and answers at 120
MODEL_SIZE = 64  # INPUT.MIN/MAX_SIZE_TEST of _opts(): figures show SIZE images at this size
FIGURE_SIDE = 320  # figures enlarge smaller images to it
GAP = 4


def _opts():
    opts = tiny_opts() + [
        "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64,
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 8, "TEST.DETECTIONS_PER_IMAGE", 8,
        "DATASETS.TEST", f"('{DATASET}',)", "MODEL.DEVICE", "cpu",
    ]
    return [str(v) for v in opts]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Paths of 3 shapes images of 120x120 in a registered dataset with ground truth."""
    if DATASET not in DatasetCatalog.list():
        register_shapes(str(tmp_path_factory.mktemp("demo_data")), prefix="demotest",
                        num_train=2, num_val=3, image_size=SIZE)
    return [d["file_name"] for d in DatasetCatalog.get(DATASET)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Two checkpoints of the same tiny model with different random initializations."""
    folder = str(tmp_path_factory.mktemp("demo_weights"))
    cfg = get_config("shapes/instunique_mask2former_shapes.yaml", *_opts())
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        DetectionCheckpointer(build_model(cfg), save_dir=folder).save(f"model_{seed}")
        paths.append(os.path.join(folder, f"model_{seed}.pth"))
    return paths


def _run(*args, weights_path, config=CONFIG):
    argv = ["--config-file", config, *args, "--opts", *_opts(), "MODEL.WEIGHTS", weights_path]
    return demo.main(argv)


def _panels(picture, count, width):
    """Split a captioned row of ``count`` panels of the given width (caption removed)."""
    top = caption_height(width)
    assert picture.shape == (top + width, count * width + (count - 1) * GAP, 3)
    return [picture[top:, k * (width + GAP): k * (width + GAP) + width] for k in range(count)]


def _differ(a, b):
    return float(np.abs(a.astype(int) - b.astype(int)).sum(-1).astype(bool).mean())


def _rgb(path):
    return demo._read(path)[:, :, ::-1]


def test_comparison_rows_with_ground_truth(images, weights, tmp_path):
    out = _run("--dataset", DATASET, "--max-images", "2", "--compare-weights", weights[0],
               "--scale", "2", "--confidence-threshold", "0", "--output", str(tmp_path),
               weights_path=weights[1])
    assert sorted(os.path.basename(p) for p in out) == ["000000.png", "000001.png"]
    picture = cv2.imread(out[0])[:, :, ::-1]
    image, baseline, ours, truth = _panels(picture, 4, 2 * SIZE)
    source = _rgb(images[0])
    assert np.array_equal(image, cv2.resize(source, (2 * SIZE, 2 * SIZE),
                                            interpolation=cv2.INTER_NEAREST))
    # Overlays are drawn, and the two models' predictions differ visibly.
    assert _differ(baseline, image) > 0.2 and _differ(truth, image) > 0.05
    assert _differ(baseline, ours) > 0.1


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def clear(self):
        self.records = []


@pytest.fixture
def demo_log():
    """The demo logger's records, heard on the logger itself: after a run's setup_logger
    the "instunique" loggers need not propagate to the root, where caplog listens."""
    logger, handler = logging.getLogger("instunique.demo"), _Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _demo_log(log):
    return [r.getMessage() for r in log.records]


def test_overlays_follow_the_inputs_and_log_what_they_draw(images, weights, tmp_path, demo_log):
    """Recursive globs; output names, formats and sizes those of the inputs; one log line
    per image with the number of instances drawn, or why there is none."""
    source = _rgb(images[0])
    inputs = tmp_path / "in"
    (inputs / "sub" / "deeper").mkdir(parents=True)
    cv2.imwrite(str(inputs / "a.jpg"), source[:, :, ::-1])
    cv2.imwrite(str(inputs / "sub" / "b.png"), source[:90, :, ::-1])  # 90 x 120
    cv2.imwrite(str(inputs / "sub" / "deeper" / "c.png"), source[:, :100, ::-1])
    (inputs / "sub" / "notes.txt").write_text("not an image")

    out_dir = tmp_path / "out"
    out = _run("--input", str(inputs / "**" / "*.png"), str(inputs), "--output", str(out_dir),
               "--confidence-threshold", "0", weights_path=weights[0])
    assert out == [str(out_dir / "sub" / "b.png"), str(out_dir / "sub" / "deeper" / "c.png"),
                   str(out_dir / "a.jpg")]
    for path, shape, magic in zip(out, [(90, SIZE), (SIZE, 100), (SIZE, SIZE)],
                                  [b"\x89PNG", b"\x89PNG", b"\xff\xd8\xff"]):
        picture = cv2.imread(path)
        assert picture.shape == (*shape, 3) and picture.std() > 10, path
        with open(path, "rb") as f:
            assert f.read(len(magic)) == magic, path
    lines = _demo_log(demo_log)
    assert len(lines) == 3
    # --confidence-threshold 0 draws every detection (TEST.DETECTIONS_PER_IMAGE of them).
    assert all(re.search(r"\[\d/3\] .*: 8 instances drawn -> ", line) for line in lines)

    demo_log.clear()
    target = str(tmp_path / "one.webp")
    assert _run("--input", images[0], "--output", target, "--confidence-threshold", "1.01",
                weights_path=weights[0]) == [target]
    assert cv2.imread(target).shape == (SIZE, SIZE, 3)
    # Nothing scores above 1: the picture is the image, and the log says why.
    [line] = _demo_log(demo_log)
    assert re.search(r"nothing drawn: no instance scores >= 1\.01 \(highest 0\.\d\d\)", line)


def test_query_response_reproduces_the_query_mask(images, weights):
    cfg = get_config("shapes/instunique_mask2former_shapes.yaml", *_opts(),
                     "MODEL.WEIGHTS", weights[0])
    predictor = Predictor(cfg)
    a, b = demo._read(images[0]), demo._read(images[1])  # BGR, as DefaultPredictor takes
    response = query_response(predictor.model, [predictor.inputs(x) for x in (a, b, a)])
    assert [m.shape for m in response.probs] == [(SIZE, SIZE)] * 3
    # The response on an image depends on that image only; on A it is the query's mask.
    np.testing.assert_allclose(response.probs[2], response.probs[0], rtol=1e-4, atol=1e-5)
    assert np.abs(response.probs[1] - response.probs[0]).mean() > 1e-3
    inst = predictor(a)["instances"]
    own = response.probs[0] > response.threshold
    agreement = [
        float((mask.numpy() > 0.5).__eq__(own).mean())
        for mask, c in zip(inst.pred_masks, inst.pred_classes) if int(c) == response.class_id
    ]
    assert max(agreement) > 0.995

    rgb = [x[:, :, ::-1] for x in (a, b, a)]
    picture = render_query_response(rgb, response, ["circle", "square", "triangle", "ring"])
    plain, on_a, on_b, on_a_again = _panels(picture, 4, SIZE)
    assert np.array_equal(on_a, on_a_again) and _differ(on_a, on_b) > 0.05
    with pytest.raises(ValueError, match="query must be an int in \\[0, 8\\)"):
        query_response(predictor.model, [predictor.inputs(a)], query=8)


def test_query_response_figure_in_one_file(images, weights, tmp_path):
    """The README's case: several images and --output naming one file give one figure of
    one row per image. An InstUnique checkpoint drives a plain Mask2Former here, reached
    without the InstUnique wrapper's adapter."""
    target = str(tmp_path / "figure.png")
    out = _run("--input", os.path.dirname(images[0]), "--max-images", "2", "--query-response",
               "--num-others", "1", "--query", "2", "--scale", "1", "--output", target,
               weights_path=weights[0],
               config=os.path.join(ROOT, "configs", "shapes", "mask2former_shapes.yaml"))
    assert out == [target]
    picture = cv2.imread(target)
    # Figures show images larger than the model's input at the input's size.
    row = caption_height(MODEL_SIZE) + MODEL_SIZE
    assert picture.shape[0] == 2 * row + 8  # two rows and the gap between them
    first, second = picture[:row], picture[row + 8:]
    _panels(first, 3, MODEL_SIZE)
    assert _differ(first, second) > 0.1  # A is a different image in each row


def test_query_response_rows_of_several_checkpoints(images, weights, tmp_path):
    """--compare-weights with two checkpoints and --names: one row per model, in order
    (baselines, then the main model); the same checkpoint twice gives identical rows."""
    target = str(tmp_path / "three.png")
    _run("--input", images[0], images[1], "--max-images", "1", "--query-response",
         "--num-others", "1", "--scale", "1", "--output", target,
         "--compare-weights", weights[1], weights[0], "--names", "b", "a", "a again",
         weights_path=weights[0])
    picture = cv2.imread(target)
    row = caption_height(MODEL_SIZE) + MODEL_SIZE
    assert picture.shape[0] == 3 * row + 2 * 8
    rows = [picture[k * (row + 8): k * (row + 8) + row] for k in range(3)]
    a, a_again = (_panels(r, 3, MODEL_SIZE) for r in rows[1:])
    assert all(np.array_equal(x, y) for x, y in zip(a, a_again))
    assert _differ(rows[0][row - MODEL_SIZE:], rows[1][row - MODEL_SIZE:]) > 0.05
    with pytest.raises(ValueError, match="--names gives 2 captions for 3 models"):
        _run("--input", images[0], "--output", str(tmp_path / "o.png"), "--query-response",
             "--compare-weights", weights[1], weights[0], "--names", "b", "a",
             weights_path=weights[0])
    with pytest.raises(ValueError, match="--names: 3 models need a caption each"):
        _run("--input", images[0], "--output", str(tmp_path / "o.png"), "--query-response",
             "--compare-weights", weights[1], weights[0], weights_path=weights[0])


def _instances(masks, scores, classes):
    inst = Instances(masks.shape[1:])
    inst.pred_masks = masks.float()
    inst.pred_boxes = BitMasks(masks).get_bounding_boxes()
    inst.scores = torch.tensor(scores)
    inst.pred_classes = torch.tensor(classes)
    return inst


def _square_masks(h, w):
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 10:40, 5:30] = True
    masks[1, 50:80, 45:90] = True
    return masks


def test_overlays_depend_only_on_predictions():
    meta = MetadataCatalog.get("demotest_meta").set(thing_classes=["a", "b"])
    image = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    masks = _square_masks(SIZE, SIZE)
    first = {"instances": _instances(masks, [0.9, 0.8], [0, 1])}
    other = {"instances": _instances(masks.roll(20, dims=2), [0.9, 0.8], [0, 1])}
    drawn = draw_outputs(image, first, meta, 0.5, scale=1.5)
    assert drawn.shape == (int(SIZE * 1.5), int(SIZE * 1.5), 3)
    assert np.array_equal(drawn, draw_outputs(image, first, meta, 0.5, scale=1.5))
    assert _differ(drawn, draw_outputs(image, other, meta, 0.5, scale=1.5)) > 0.05
    # Below the threshold nothing is drawn.
    blank = draw_outputs(image, first, meta, 0.95)
    assert np.array_equal(blank, image)
    with pytest.raises(ValueError, match="image of size \\(120, 120\\).*\\(50, 60\\)"):
        draw_outputs(image[:50, :60], first, meta)


def test_warp_outputs_moves_masks_and_boxes():
    masks = _square_masks(SIZE, SIZE)
    outputs = {"instances": _instances(masks, [0.9, 0.8], [0, 1])}
    flip = AffineWarp.hflip(SIZE, SIZE)
    flipped = warp_outputs(outputs, flip)["instances"]
    assert torch.equal(flipped.pred_masks.bool(), masks.flip(-1))
    assert flipped.pred_boxes.tensor[0].tolist() == [SIZE - 30.0, 10.0, SIZE - 5.0, 40.0]
    assert torch.equal(flipped.scores, outputs["instances"].scores)

    crop = AffineWarp.crop(SIZE, SIZE, 20, 0, 60, 60)
    back = warp_outputs(warp_outputs(outputs, crop), crop.inverse())["instances"]
    window = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    window[20:80, :60] = True
    assert torch.equal(back.pred_masks.bool(), masks & window)

    seg = torch.zeros(60, 60, dtype=torch.int32)  # a panoptic map of the crop
    seg[:, :10] = 1
    moved, _ = warp_outputs({"panoptic_seg": (seg, [])}, crop.inverse())["panoptic_seg"]
    assert int(moved[0, 0]) == -1 and int(moved[30, 5]) == 1 and int(moved[30, 50]) == 0
    with pytest.raises(ValueError, match="src_size"):
        warp_outputs(outputs, AffineWarp.hflip(50, 50))


def test_equivariant_predictions_give_matching_panels():
    meta = MetadataCatalog.get("demotest_meta").set(thing_classes=["a", "b"])
    image = np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    outputs = {"instances": _instances(_square_masks(SIZE, SIZE), [0.9, 0.8], [0, 1])}
    flip = AffineWarp.hflip(SIZE, SIZE)
    row = equivariance_row(image, outputs, flip, warp_outputs(outputs, flip), meta, scale=1.0)
    on_x, on_tx, back = _panels(row, 3, SIZE)
    assert np.array_equal(on_x, back) and _differ(on_x, on_tx) > 0.05
    # A model that ignores T gives a different last panel.
    row = equivariance_row(image, outputs, flip, outputs, meta, scale=1.0)
    assert _differ(_panels(row, 3, SIZE)[2], on_x) > 0.05


def _frames(path):
    capture = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def test_video_keeps_size_and_container(images, weights, tmp_path, demo_log):
    video = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5, (160, 90))
    for path in images:
        writer.write(cv2.resize(cv2.imread(path), (160, 90)))
    writer.release()
    out = _run("--video-input", video, "--max-images", "2", "--confidence-threshold", "0",
               "--output", str(tmp_path / "vid"), weights_path=weights[0])
    assert out == [str(tmp_path / "vid" / "clip.avi")]
    frames = _frames(out[0])
    assert len(frames) == 2 and frames[0].shape == (90, 160, 3)
    lines = _demo_log(demo_log)
    assert [line.split(": ")[0] for line in lines[:2]] == [f"{video} frame 1/2",
                                                         f"{video} frame 2/2"]
    assert all("8 instances drawn" in line for line in lines[:2])


def test_panoptic_outputs_take_the_panoptic_path():
    meta = MetadataCatalog.get("demotest_panoptic").set(
        thing_classes=["a"], stuff_classes=["a", "sky"]
    )
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    seg = torch.zeros(SIZE, SIZE, dtype=torch.int32)
    seg[:40] = 1
    seg[60:80, 60:80] = 2
    info = [{"id": 1, "category_id": 1, "isthing": False},
            {"id": 2, "category_id": 0, "isthing": True, "score": 0.9}]
    drawn = draw_outputs(image, {"panoptic_seg": (seg, info)}, meta)
    assert _differ(drawn[:40], image[:40]) > 0.5 and _differ(drawn[60:80, 60:80],
                                                             image[60:80, 60:80]) > 0.5
    assert _differ(drawn[45:55, :50], image[45:55, :50]) < 0.05


def test_compose_row_sizes_and_errors():
    panels = [np.zeros((40, 30, 3), np.uint8), np.zeros((80, 20, 3), np.uint8)]
    row = compose_row(panels, ["left", "right"])
    assert row.shape == (80 + caption_height(60), 60 + GAP + 20, 3)
    assert row[caption_height(60):].max() == 255  # the white gap
    with pytest.raises(ValueError, match="2 panels"):
        compose_row(panels, ["one"])
    with pytest.raises(ValueError, match="panel 1 must be an RGB array"):
        compose_row([panels[0], np.zeros((5, 5), np.uint8)])


def test_bad_arguments_fail_before_any_model_is_built(images, weights, tmp_path, monkeypatch):
    def no_model(cfg):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(demo, "Predictor", no_model)
    w = weights[0]
    missing = str(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="input not found: .*nope.png"):
        _run("--input", missing, "--output", str(tmp_path), weights_path=w)
    with pytest.raises(FileNotFoundError, match="no image file matches the pattern .*zzz"):
        _run("--input", str(tmp_path / "**" / "*.zzz"), "--output", str(tmp_path),
             weights_path=w)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="in folder .*empty"):
        _run("--input", str(tmp_path / "empty"), "--output", str(tmp_path), weights_path=w)
    fake = tmp_path / "text.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .*text.png as an image"):
        _run("--input", images[0], str(fake), "--output", str(tmp_path / "o"), weights_path=w)
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS: checkpoint not found: .*gone"):
        _run("--input", images[0], "--output", str(tmp_path / "o"),
             weights_path=str(tmp_path / "gone.pth"))
    with pytest.raises(FileNotFoundError, match="--compare-weights: checkpoint not found"):
        _run("--dataset", DATASET, "--compare-weights", str(tmp_path / "base.pth"),
             "--output", str(tmp_path / "o"), weights_path=w)
    with pytest.raises(FileNotFoundError, match="config file not found: .*absent.yaml"):
        _run("--input", images[0], "--output", str(tmp_path / "o"), weights_path=w,
             config=str(tmp_path / "absent.yaml"))
    with pytest.raises(ValueError, match="names one file but there are 2 pictures to write; "
                                         "give a folder"):
        _run("--input", *images[:2], "--output", str(tmp_path / "x.png"), weights_path=w)
    with pytest.raises(ValueError, match="--output .*x.gif: unknown image extension"):
        _run("--input", images[0], "--output", str(tmp_path / "x.gif"), weights_path=w)
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ValueError, match="--output .*taken is a file; give a folder"):
        _run("--input", images[0], "--output", str(tmp_path / "taken"), weights_path=w)

    with pytest.raises(FileNotFoundError, match="video not found: .*clip.avi"):
        _run("--video-input", str(tmp_path / "clip.avi"), "--output", str(tmp_path),
             weights_path=w)
    with pytest.raises(ValueError, match="cannot read .*text.png as a video"):
        _run("--video-input", str(fake), "--output", str(tmp_path), weights_path=w)
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (32, 32))
    writer.write(np.zeros((32, 32, 3), np.uint8))
    writer.release()
    with pytest.raises(ValueError, match="--output .*out.webm: cannot write a video of that "
                                         "extension; use one of .mp4"):
        _run("--video-input", video, "--output", str(tmp_path / "out.webm"), weights_path=w)


def _write_metrics(path, scale):
    lines = [
        {"iteration": it, "total_loss": 9.0 * scale / it, "loss_ce": 1.0 / it, "loss_mask": 2.0,
         "loss_dice": 3.0 / it, "loss_ce_0": 1.5, "lr": 1e-4, "data_time": 0.1}
        for it in (19, 39, 59)
    ]
    lines.append({"iteration": 59, "segm/AP": 12.5 * scale, "segm/AP50": 30.0})
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in lines) + '\n{"iteration": 79, "total_l')


def test_each_run_keeps_its_colour_in_every_panel():
    runs = {"baseline": [{"iteration": i, "total_loss": 2.0 - i / 10} for i in range(3)],
            "InstUnique": [{"iteration": i, "total_loss": 1.5, "loss_cross_image": 0.1}
                           for i in range(3)]}
    fig = curves_figure(runs, keys=["total_loss", "loss_cross_image"])
    shared, alone = fig.axes
    colours = {line.get_label(): line.get_color() for line in shared.lines}
    assert len(set(colours.values())) == 2
    assert [line.get_color() for line in alone.lines] == [colours["InstUnique"]]


def test_curves_from_metrics_json(tmp_path):
    for run, scale in (("baseline", 1.0), ("instunique", 0.5)):
        (tmp_path / run).mkdir()
        _write_metrics(tmp_path / run / "metrics.json", scale)
    records = load_metrics(str(tmp_path / "baseline" / "metrics.json"))
    assert [r["iteration"] for r in records] == [19, 39, 59]  # torn last line skipped
    assert records[-1]["segm/AP"] == 12.5 and records[-1]["loss_mask"] == 2.0
    assert curve_keys([records]) == ["total_loss", "loss_ce", "loss_dice", "loss_mask", "segm/AP"]
    assert "loss_ce_0" in curve_keys([records], include_aux=True)

    target = str(tmp_path / "curves.png")
    plot_curves_cli.main([str(tmp_path / "baseline"), str(tmp_path / "instunique"),
                          "--output", target, "--log"])
    picture = cv2.imread(target)
    assert picture.shape == (2 * 320, 4 * 320, 3) and picture.std() > 5
    # The curves are drawn from the data: other values give other pixels.
    other = str(tmp_path / "other.png")
    plot_curves_cli.main([str(tmp_path / "baseline"), "--output", other, "--log"])
    assert _differ(cv2.imread(other), picture) > 0.001

    with pytest.raises(FileNotFoundError, match="metrics file not found: .*absent.json"):
        load_metrics(str(tmp_path / "absent.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("hello\n[1, 2]\n")
    with pytest.raises(ValueError, match="bad.json holds no metrics record"):
        load_metrics(str(bad))


# ------------------------------------------------------------ the README's demo commands

README_SCRIPTS = {"demo/demo.py": demo.main, "tools/plot_curves.py": plot_curves_cli.main}


def readme_commands():
    """argv of every command of the README's "Pictures" section, its $VARIABLES expanded."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("\n## Pictures\n")
    section = text[start: text.index("\n## ", start + 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            assignment = re.match(r"([A-Z_]+)=(\S+)", line)
            if assignment:
                variables[assignment[1]] = assignment[2]
            elif line.strip():
                for name in sorted(variables, key=len, reverse=True):
                    line = line.replace(f"${name}", variables[name])
                assert "$" not in line, f"unknown variable in the README: {line}"
                commands.append(shlex.split(line, comments=True))
    return commands


def _train(config, dataset):
    """Command (a) of the README, a single iteration long, in the current folder."""
    train_net.main(default_argument_parser().parse_args([
        "--config-file", config, "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.INST_UNIQUE.CROSS_IMAGE.MEMORY_PIXELS", "1000",
    ]))


def _here(arg):
    """A README argument as the test runs it: its datasets are the 2 images registered
    here, and the accuracy study's checkpoints the one trained here."""
    for name in ("shapes_val", "shapes_crowd_val"):
        arg = arg.replace(name, "demoreadme_val")
    if arg.startswith("benchmarks/results/accuracy/") and arg.endswith(".pth"):
        return "output/instunique_mask2former_shapes/model_final.pth"
    return arg


def test_readme_demo_commands_run_as_written(tmp_path, monkeypatch):
    """Every command of the README's Pictures section, on a checkpoint trained here with
    the config those commands name; only the dataset (shapes_val -> 2 images) differs."""
    commands = readme_commands()
    scripts = [c[1] for c in commands]
    assert scripts.count("demo/demo.py") >= 5 and "tools/plot_curves.py" in scripts
    assert all(c[0] == "python3" and c[1] in README_SCRIPTS for c in commands), commands

    if "demoreadme_val" not in DatasetCatalog.list():
        register_shapes(str(tmp_path / "data"), prefix="demoreadme", num_train=2, num_val=2,
                        image_size=SIZE)
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(ROOT, "configs"), "configs")
    _train("configs/shapes/instunique_mask2former_shapes.yaml", "demoreadme_train")
    # The baseline has InstUnique's architecture: its checkpoint would load the same way.
    shutil.copytree("output/instunique_mask2former_shapes",
                    "output/paired_views_mask2former_shapes")
    source = cv2.imread(DatasetCatalog.get("demoreadme_val")[0]["file_name"])
    os.makedirs("photos/trip")
    cv2.imwrite("photos/a.jpg", source)
    cv2.imwrite("photos/trip/b.jpg", source[:100])
    writer = cv2.VideoWriter("clip.avi", cv2.VideoWriter_fourcc(*"MJPG"), 5, (160, 90))
    writer.write(cv2.resize(source, (160, 90)))
    writer.release()

    for command in commands:
        argv = [_here(a) for a in command[2:]]
        if "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES" in argv:  # the study's 40-query models
            k = argv.index("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES")
            del argv[k:k + 2]
        written = README_SCRIPTS[command[1]](argv)
        if command[1] == "tools/plot_curves.py":
            assert cv2.imread(written) is not None
            continue
        pictures = [cv2.imread(p) for p in written if not p.endswith(".avi")]
        assert written and all(p is not None for p in pictures)
        if "--input" in argv:
            assert written == ["output/demo/overlays/a.jpg", "output/demo/overlays/trip/b.jpg"]
            assert [p.shape for p in pictures] == [source.shape, source[:100].shape]
        elif "--video-input" in argv:
            assert written == ["output/demo/clip.avi"]
            assert [f.shape for f in _frames(written[0])] == [(90, 160, 3)]
        elif argv[argv.index("--output") + 1].endswith(".png"):
            assert len(written) == 1  # one figure
        else:
            assert len(written) == 2  # --max-images 8 of 2 images
            # Figures enlarge the 120 px images to 320 px, under a caption.
            assert pictures[0].shape[0] == FIGURE_SIDE + caption_height(FIGURE_SIDE)


def test_a_checkpoint_of_another_architecture_is_refused(images, weights, tmp_path):
    """An 8-query checkpoint in a 12-query model would draw 4 random queries: refused,
    naming the checkpoint and the parameters it leaves unloaded."""
    argv = ["--config-file", CONFIG, "--input", images[0], "--output", str(tmp_path / "o"),
            "--opts", *_opts(), "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "12",
            "MODEL.WEIGHTS", weights[0]]
    with pytest.raises(ValueError, match=f"MODEL.WEIGHTS: {re.escape(weights[0])} leaves "
                                         r"\d+ entries .*query_feat"):
        demo.main(argv)


def test_weights_load_once_and_errors_speak_of_the_demo(images, weights, tmp_path):
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    checkpoint_log = logging.getLogger("fvcore.common.checkpoint")  # may not propagate
    checkpoint_log.addHandler(handler)
    level = checkpoint_log.level
    checkpoint_log.setLevel(logging.INFO)
    try:
        _run("--input", images[0], "--output", str(tmp_path / "one.png"),
             weights_path=weights[0])
    finally:
        checkpoint_log.removeHandler(handler)
        checkpoint_log.setLevel(level)
    messages = [r.getMessage() for r in records]
    assert any("Loading from" in m or "loading" in m.lower() for m in messages), messages
    assert not any("from scratch" in m or "No checkpoint found" in m for m in messages)
    with pytest.raises(ValueError, match=r"^demo/demo.py with MODEL.WEIGHTS '' would evaluate"):
        _run("--input", images[0], "--output", str(tmp_path / "two.png"), weights_path="")
