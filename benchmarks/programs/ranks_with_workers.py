"""One MPI rank whose DataLoader has two workers, all blocked for good: a stuck input pipeline.

Run as `mpiexec -n 4 python ranks_with_workers.py` with BENCH_READY_DIR set. Each worker touches
BENCH_READY_DIR/rank<R>-worker<W> from inside __getitem__ and then waits forever, so once all
files exist every rank has two live workers and is blocked waiting for its first batch.
"""

import os
import threading
from pathlib import Path

from torch.utils.data import DataLoader, Dataset, get_worker_info

READY_DIR = Path(os.environ["BENCH_READY_DIR"])
RANK = os.environ.get("PMI_RANK", "0")


class BlockingDataset(Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int):
        worker = get_worker_info()
        (READY_DIR / f"rank{RANK}-worker{worker.id}").touch()
        threading.Event().wait()  # never set: this worker is stuck, and so is its rank


def main() -> None:
    loader = DataLoader(BlockingDataset(), batch_size=4, num_workers=2)
    for _ in loader:
        pass


if __name__ == "__main__":
    main()
