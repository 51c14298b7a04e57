"""HF transformers Trainer job in which a callback runs `trainer.evaluate()` on the main
process only.

Launch (3 ranks, gloo on CPU; Trainer output goes under the directory given as the first
argument, default the current one; nothing is downloaded: the model is built from a config and
the data is made in memory):

    torchrun --nproc-per-node 3 --master-port 29561 hf_trainer_rank0_eval.py [OUT_DIR]

The hang: `EvalOnMainAtStep.on_step_end` calls `trainer.evaluate()` under
`if state.global_step == 2 and state.is_world_process_zero` ("a quick look at the eval loss").
Evaluation is a distributed operation (the eval set is sharded over the ranks and the results
are gathered), so rank 0 (the odd rank) runs evaluation's collectives while ranks 1 and 2 go on
to training step 3 and run its collectives:
  1. rank 0's first eval collective, the all_gather of the batch's label count
     (`_get_num_items_in_batch` in `prediction_step`), silently pairs with ranks 1 and 2's
     all_gather of the same kind (the label count at the start of their step 3): same op, same
     shape, so gloo completes it.
  2. then rank 0 waits in `gather_for_metrics` (all_gather of the eval losses), while ranks 1
     and 2 wait in DDP's buffer broadcast in the forward of step 3 (BERT's position_ids /
     token_type_ids buffers, broadcast_buffers=True). Different ops: gloo pairs neither, and
     nothing errors until the process-group timeout (300 s, `ddp_timeout`).
(With `logging_steps=1` the mismatch is instead all_gather vs all_gather of different sizes, and
gloo aborts rank 1 at once: "Received data size doesn't match expected size", so logging is left
at every 50 steps.)

Where each rank waits:
  rank 0:         `metrics = self.trainer.evaluate()` in EvalOnMainAtStep.on_step_end ->
                  Trainer.evaluation_loop -> Accelerator.gather_for_metrics -> dist.all_gather
                  (Flight Recorder: gloo:all_gather)
  rank 1, rank 2: `trainer.train()` in main() -> Trainer.training_step -> compute_loss ->
                  model(**inputs) -> DistributedDataParallel._pre_forward -> _sync_buffers ->
                  _distributed_broadcast_coalesced (Flight Recorder: gloo:broadcast)
"""

import os
import sys

import torch
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

SEQ = 12
VOCAB = 64


class ToyParity(Dataset):
    """Token sequences labelled by whether token 7 occurs in them."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.labels[i]}


class EvalOnMainAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        print(f"[rank {args.process_index}] step {state.global_step} done", flush=True)
        if state.global_step == self.step and state.is_world_process_zero:
            print(f"[rank 0] step {state.global_step}: a quick look at the eval loss", flush=True)
            metrics = self.trainer.evaluate()
            print(f"step {state.global_step}: eval {metrics}", flush=True)


def main():
    out_dir = os.path.join(sys.argv[1] if len(sys.argv) > 1 else os.getcwd(), "hf_trainer_out")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=SEQ, num_labels=2)
    model = BertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=out_dir,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=300,
        ddp_find_unused_parameters=False,
        report_to=[],
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=8,
        learning_rate=1e-3,
        logging_steps=50,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    callback = EvalOnMainAtStep(step=2)
    trainer = Trainer(model=model, args=args, train_dataset=ToyParity(96, seed=1),
                      eval_dataset=ToyParity(24, seed=2), callbacks=[callback])
    callback.trainer = trainer
    trainer.train()


if __name__ == "__main__":
    main()
