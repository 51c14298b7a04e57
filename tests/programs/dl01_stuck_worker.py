"""DL-01: a DataLoader worker's __getitem__ never returns (a read on a hung filesystem).

Index 5 opens a FIFO that nobody writes to; the main process waits for its batch forever.
"""

from hangprog import heartbeat, ready, record_pid, scratch

heartbeat()

import os  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

STUCK_INDEX = 5


class FileDataset(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        if index == STUCK_INDEX:
            path = scratch("stalled-share.fifo")
            record_pid(kind="worker", index=index)
            with open(path, "rb") as f:  # blocks: a FIFO with no writer
                return torch.tensor(float(len(f.read())))
        return torch.tensor(float(index))


def main():
    os.mkfifo(scratch("stalled-share.fifo"))
    loader = DataLoader(FileDataset(), batch_size=1, num_workers=2, timeout=0)
    ready(kind="main")
    for _batch in loader:
        pass


if __name__ == "__main__":
    main()
