"""Workers: leases.py (the shared base: claim, lease renewal, shutdown), device.py (DeviceWorker: a device's
jobs through the engine); the upstream providers' worker is upstream/worker.py, on the same base."""

from .device import DeviceWorker
from .leases import PROVENANCE_CODE, PROVENANCE_FAILED, LeasedWorker, default_batch_max_pixels, new_worker_id

__all__ = [
    "PROVENANCE_CODE",
    "PROVENANCE_FAILED",
    "DeviceWorker",
    "LeasedWorker",
    "default_batch_max_pixels",
    "new_worker_id",
]
