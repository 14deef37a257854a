"""BatchNorm that agrees across the processes of a data-parallel run."""
from detectron2.layers import NaiveSyncBatchNorm
from torch import nn


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``model`` by a synchronised one, state kept.

    Without this each process normalises with, and keeps running statistics of, its own
    images only, and the replicas' buffers drift apart. torch's SyncBatchNorm runs on
    CUDA only; detectron2's NaiveSyncBatchNorm all-reduces through whatever backend the
    process group has (gloo on the CPU), so it serves CPU processes.
    """
    on_cuda = any(p.device.type == "cuda" for p in model.parameters())
    if on_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            synced = NaiveSyncBatchNorm(
                child.num_features, eps=child.eps, momentum=child.momentum,
                affine=child.affine, track_running_stats=child.track_running_stats,
            ).to(next(child.buffers(), child.weight).device)
            synced.load_state_dict(child.state_dict())
            synced.train(child.training)
            setattr(model, name, synced)
        else:
            convert_sync_batchnorm(child)
    return model
