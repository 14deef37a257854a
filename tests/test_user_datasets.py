"""A user's own COCO-format data through DATASETS.REGISTER: the README's worked example
trains and evaluates, the class count is checked or filled in, and every malformed entry
fails in train_net.setup (before a model or loader is built), naming the entry."""
import json
import os
import re
import shlex
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

from instunique import add_instunique_config
from instunique.data.user_datasets import (
    NUM_CLASSES_KEYS,
    num_classes_key,
    parse_spec,
    setup_user_datasets,
)

from utils import CONFIGS, ROOT, tiny_opts

sys.path.insert(0, ROOT)
import train_net  # noqa: E402

CONFIG = os.path.join(CONFIGS, "shapes/mask2former_shapes.yaml")


def _readme_block(heading: str, lang: str, doc: str = "README.md") -> str:
    with open(os.path.join(ROOT, doc)) as f:
        text = f.read()
    section = text.split(f"\n{heading}\n", 1)[1]
    return section.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


def _shell_commands(block: str):
    """The block's commands as argv lists, as bash reads them: continuation lines joined,
    comments dropped, ``$VAR`` from the block's own assignments expanded."""
    env, commands = {}, []
    for line in block.replace("\\\n", "").splitlines():
        line = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], line)
        argv = shlex.split(line, comments=True)
        if len(argv) == 1 and re.fullmatch(r"\w+=\S*", argv[0]):
            key, value = argv[0].split("=", 1)
            env[key] = value
        elif argv:
            commands.append(argv)
    return commands


def _write_coco(root, categories=((3, "dog"), (1, "cat")), num_images=2, size=32):
    """A small COCO instances dataset: one square per image; returns (json, image_root)."""
    image_root = os.path.join(root, "images")
    os.makedirs(image_root, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        name = f"{i:03d}.png"
        cv2.imwrite(os.path.join(image_root, name), np.full((size, size, 3), 40 * i, np.uint8))
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        x0 = 4 + i
        square = [x0, 4, x0 + 10, 4, x0 + 10, 14, x0, 14]
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": categories[0][0],
                            "segmentation": [square], "bbox": [x0, 4, 10, 10], "area": 100,
                            "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": n} for c, n in categories]}
    json_file = os.path.join(root, "instances.json")
    with open(json_file, "w") as f:
        json.dump(coco, f)
    return json_file, image_root


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _config(*opts):
    cfg = get_cfg()
    add_instunique_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_readme_worked_example_trains_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generate, train, evaluate = _shell_commands(_readme_block("### Your own data", "bash"))
    assert generate[:2] == ["python3", "-c"]
    exec(generate[2], {})
    assert os.path.isfile("datasets/toy/shapes/annotations/instances_val.json")

    assert train[:2] == ["python3", "train_net.py"] and "-1" in train
    argv = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in train[2:]]
    fast = ["SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.IMS_PER_BATCH", "2",
            "DATALOADER.NUM_WORKERS", "0", *[str(o) for o in tiny_opts()]]
    train_net.main(default_argument_parser().parse_args(argv + fast))

    out = tmp_path / "output" / "toy"
    with open(out / "metrics.json") as f:
        final = [json.loads(line) for line in f][-1]
    assert 0.0 <= final["segm/AP"] <= 100.0
    # The categories reached the evaluator's metadata.
    assert {"segm/AP-circle", "segm/AP-ring"} <= set(final)
    with open(out / "config.yaml") as f:
        saved = CN.load_cfg(f)
    assert saved.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 4  # -1 became the JSON's 4 categories
    weights = torch.load(out / "model_final.pth", weights_only=False)["model"]
    class_heads = [v for k, v in weights.items() if k.endswith("class_embed.weight")]
    assert class_heads and all(w.shape[0] == 4 + 1 for w in class_heads)  # + no-object

    assert evaluate[:2] == ["python3", "train_net.py"] and "--eval-only" in evaluate
    results = train_net.main(default_argument_parser().parse_args(evaluate[2:]))
    # The saved config and weights reproduce the training's final evaluation.
    assert results["segm"]["AP"] == pytest.approx(final["segm/AP"])


def test_readme_config_file_reads_as_the_command_line():
    # The README links to the config-file form in GETTING_STARTED.
    text = _readme_block("## Your own data", "yaml", "docs/GETTING_STARTED.md")
    cfg = _config()
    cfg.merge_from_other_cfg(CN.load_cfg(re.sub(r"^_BASE_:.*\n", "", text, flags=re.M)))
    train = _shell_commands(_readme_block("### Your own data", "bash"))[1]
    cli = _config(*train[4:])
    for key in ("DATASETS.REGISTER", "DATASETS.TRAIN", "DATASETS.TEST"):
        assert list(_get(cfg, key)) == list(_get(cli, key)), key
    for key in ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "OUTPUT_DIR"):
        assert _get(cfg, key) == _get(cli, key), key
    assert "_BASE_: configs/shapes/mask2former_shapes.yaml" in text


@pytest.fixture
def pets(tmp_path):
    """A registered two-class dataset, categories listed out of id order."""
    json_file, image_root = _write_coco(str(tmp_path / "pets"))
    name = f"pets_{tmp_path.name}"
    cfg = _config("DATASETS.REGISTER", f"('{name}={json_file}:{image_root}',)")
    setup_user_datasets(cfg)
    return name, json_file, image_root


def test_registration_matches_detectron2s_own_reading(pets):
    name, json_file, image_root = pets
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["cat", "dog"]  # id order, not file order
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1}
    assert (meta.json_file, meta.image_root, meta.evaluator_type) == (
        json_file, image_root, "coco")
    records = DatasetCatalog.get(name)  # load_coco_json sets the same metadata again
    assert [r["annotations"][0]["category_id"] for r in records] == [1, 1]  # "dog"
    # The same entry again, the path written relative, is accepted.
    rel = os.path.relpath(json_file)
    setup_user_datasets(_config("DATASETS.REGISTER", f"('{name}={rel}:{image_root}',)"))


@pytest.mark.parametrize(
    "arch, key",
    [("Mask2Former", "MODEL.SEM_SEG_HEAD.NUM_CLASSES"),
     ("InstUnique", "MODEL.SEM_SEG_HEAD.NUM_CLASSES"),
     ("GeneralizedRCNN", "MODEL.ROI_HEADS.NUM_CLASSES"),
     ("SparseInst", "MODEL.SPARSE_INST.DECODER.NUM_CLASSES")],
)
def test_class_count_is_taken_from_the_categories_or_checked(pets, arch, key):
    name = pets[0]
    data = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)",
            "MODEL.META_ARCHITECTURE", arch]
    cfg = _config(*data, key, -1)
    assert num_classes_key(cfg) == key
    setup_user_datasets(cfg)
    assert _get(cfg, key) == 2
    for other in set(NUM_CLASSES_KEYS.values()) - {key}:  # only the segmenter's own key
        assert _get(cfg, other) == _get(_config(), other), other

    with pytest.raises(ValueError, match=rf"{re.escape(key)} is 5 but dataset '{name}' has 2"):
        setup_user_datasets(_config(*data, key, 5))


def test_train_and_test_sets_with_other_categories_are_refused(pets, tmp_path):
    name = pets[0]
    json_file, image_root = _write_coco(str(tmp_path / "birds"), ((1, "owl"),), 1)
    with pytest.raises(ValueError, match=rf"'{name}' \(2 categories.*'birds_x' \(1 categ"):
        setup_user_datasets(_config(
            "DATASETS.REGISTER", f"('birds_x={json_file}:{image_root}',)",
            "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "('birds_x',)",
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", -1))


def _bad(tmp_path, case):
    json_file, image_root = _write_coco(str(tmp_path / "d"))
    missing_json = str(tmp_path / "nowhere.json")
    if case == "no name":
        return f"{json_file}:{image_root}", ValueError, "NAME=JSON:IMAGE_ROOT"
    if case == "empty name":
        return f"={json_file}:{image_root}", ValueError, "a dataset name"
    if case == "ambiguous colon":
        return "a=x:y:z", ValueError, "cannot tell where JSON ends"
    if case == "no image root":
        return f"a={json_file}:", ValueError, "both paths"
    if case == "missing json":
        return f"a={missing_json}:{image_root}", FileNotFoundError, "JSON file not found"
    if case == "missing image root":
        return f"a={json_file}:{tmp_path}/none", FileNotFoundError, "image root not found"
    if case == "image root is a file":
        return f"a={json_file}:{json_file}", NotADirectoryError, "image root is not a folder"
    if case == "not json":
        with open(json_file, "w") as f:
            f.write("{")
        return f"a={json_file}:{image_root}", ValueError, "is not valid JSON"
    if case == "not coco":
        with open(json_file, "w") as f:
            json.dump({"images": []}, f)
        return f"a={json_file}:{image_root}", ValueError, "no 'categories' list"
    if case == "images missing":
        os.remove(os.path.join(image_root, "001.png"))
        return (f"a={json_file}:{image_root}", FileNotFoundError,
                r"1 of 2 images .* '001.png' \(image id 2\)")
    if case == "name taken":  # detectron2's builtin COCO, registered with other files
        return f"coco_2017_val={json_file}:{image_root}", ValueError, "already registered"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "no name", "empty name", "ambiguous colon", "no image root", "missing json",
    "missing image root", "image root is a file", "not json", "not coco", "images missing",
    "name taken",
])
def test_malformed_entry_fails_in_setup_naming_it(tmp_path, case):
    spec, error, message = _bad(tmp_path, case)
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "out"),
         "DATASETS.REGISTER", repr((spec,))])
    with pytest.raises(error, match=re.escape(f"DATASETS.REGISTER entry {spec!r}: ")) as e:
        train_net.setup(args)
    assert re.search(message, str(e.value)), str(e.value)
    assert not os.path.exists(tmp_path / "out")  # stopped before default_setup wrote there


def test_one_name_given_twice_with_other_files_is_refused(tmp_path):
    first = _write_coco(str(tmp_path / "one"))
    second = _write_coco(str(tmp_path / "two"))
    specs = [f"twice={first[0]}:{first[1]}", f"twice={second[0]}:{second[1]}"]
    with pytest.raises(ValueError, match=re.escape(f"entry {specs[1]!r}: dataset name 'twice' "
                                                   f"is also given by {specs[0]!r}")):
        setup_user_datasets(_config("DATASETS.REGISTER", repr(tuple(specs))))
    assert "twice" not in DatasetCatalog.list()


def test_windows_style_paths_split_after_the_json():
    spec = parse_spec(r"w=C:\data\train.json:D:\images")
    assert spec.json_file.endswith(r"C:\data\train.json")
    assert spec.image_root.endswith(r"D:\images")
    assert spec.name == "w"
