"""Official Swin checkpoints in the key layout of ``TimmBackbone`` (tools/convert_swin_to_d2.py).

Inputs it takes, each a dict of tensors or arrays, found under "model" or "state_dict" if present:

* Microsoft's Swin (github.com/microsoft/Swin-Transformer releases, e.g.
  swin_base_patch4_window12_384_22k.pth), and Mask2Former's .pkl of it, which
  tools/convert-pretrained-swin-model-to-d2.py makes by storing that dict unchanged under
  "model" with ``matching_heuristics``: keys without a prefix.
* A trained Mask2Former model (its model zoo's model_final_*.pkl): the backbone under
  ``backbone.``, next to the heads, whose keys pass through unchanged.
* timm's own Swin weights (downsample already at the start of stages 1-3).

Facts relied on (Mask2Former mask2former/modeling/backbone/swin.py; Microsoft's
models/swin_transformer.py; timm 1.0.31 timm/models/swin_transformer.py, whose
``checkpoint_filter_fn`` makes the same two layout changes for timm's own loading):

* Block parameters share names: ``layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj,
  attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}``, and ``patch_embed.{proj,
  norm}``. A timm ``features_only`` model flattens ``layers.{i}`` to ``layers_{i}``; the adapter
  holds it as ``body``.
* The official patch merging closes stage i (``layers.{i}.downsample``, i = 0..2); timm's opens
  stage i + 1 (``layers.{i+1}.downsample``). Same parameters and shapes.
* ``attn.relative_position_index`` and the shifted blocks' ``attn_mask`` are buffers the official
  code saves and timm recomputes (non-persistent): dropped.
* ``norm{i}`` are the per-output LayerNorms of D2SwinTransformer, kept by name (the adapter has
  the same). ``norm`` and ``head`` belong to the ImageNet classifier, which neither uses:
  dropped. Mask2Former's Swin configs leave absolute position embeddings off (APE False), and
  the adapter has none: a checkpoint with them is refused.
"""
import re
from typing import Any, Dict, List, Mapping, Tuple

__all__ = ["convert_swin_state_dict", "unwrap_state_dict"]

_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)")
_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(.+)")
_OUTPUT_NORM = re.compile(r"norm[0-3]\.(weight|bias)")
_RECOMPUTED_BUFFERS = ("attn.relative_position_index", "attn_mask")
_CLASSIFIER = re.compile(r"(norm|head|head\.fc)\.(weight|bias)")
_PREFIX = "backbone."


def unwrap_state_dict(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The tensors of a loaded checkpoint file: under "model" or "state_dict" when present."""
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def _swin_key(key: str, downsample_shift: int) -> str:
    """A backbone key, without ``backbone.``, in the adapter's layout; "" if it is dropped."""
    if key.endswith(_RECOMPUTED_BUFFERS) or _CLASSIFIER.fullmatch(key):
        return ""
    if key.startswith("patch_embed."):
        return f"body.{key}"
    if _OUTPUT_NORM.fullmatch(key):
        return key
    block = _BLOCK.fullmatch(key)
    if block:
        stage, index, rest = block.groups()
        return f"body.layers_{stage}.blocks.{index}.{rest}"
    downsample = _DOWNSAMPLE.fullmatch(key)
    if downsample:
        stage, rest = downsample.groups()
        return f"body.layers_{int(stage) + downsample_shift}.downsample.{rest}"
    raise ValueError(
        f"Swin checkpoint key {key!r} has no counterpart in the timm adapter (absolute position "
        "embeddings and non-Swin layers are not supported)"
    )


def convert_swin_state_dict(state: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """Official Swin keys -> ``backbone.`` keys of a model whose backbone is ``TimmBackbone``.

    Returns the converted dict (values untouched; keys outside ``backbone.`` of a full model
    kept as they are) and the dropped keys, as they were in ``state``.
    """
    full_model = any(k.startswith(_PREFIX) for k in state)
    backbone = {
        (k[len(_PREFIX):] if full_model else k): k
        for k in state
        if not full_model or k.startswith(_PREFIX)
    }
    # Official files have a downsample in stage 0; timm's layout never does.
    official = any(k.startswith("layers.0.downsample.") for k in backbone)
    shift = 1 if official else 0
    converted: Dict[str, Any] = {
        k: v for k, v in state.items() if full_model and not k.startswith(_PREFIX)
    }
    dropped: List[str] = []
    for key, original in backbone.items():
        new_key = _swin_key(key, shift)
        if not new_key:
            dropped.append(original)
            continue
        if _PREFIX + new_key in converted:
            raise ValueError(f"two Swin checkpoint keys map to {_PREFIX + new_key!r}")
        converted[_PREFIX + new_key] = state[original]
    return converted, dropped
