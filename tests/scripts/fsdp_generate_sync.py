"""2 processes, a tiny Llama sharded with FSDP2: rank 0's rows end at their first token (every token is an EOS
for it), rank 1's run to max_new_tokens. Prints each rank's response width; with all_finished both decode the
same number of steps, without it rank 0 would stop calling the (collective) forward and the run would hang."""

import sys

import torch
import torch.distributed as dist

from ppolm.fsdp import shard
from ppolm.models import load_model, load_tokenizer
from ppolm.rollout import generate

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    synced = sys.argv[1] == "synced"
    torch.manual_seed(0)
    model, tok = load_model("tiny-random-llama"), load_tokenizer("tiny-random-llama")
    shard(model)
    ids = torch.tensor([tok("hello world", add_special_tokens=False)["input_ids"]] * 2)
    eos = list(range(len(tok))) if rank == 0 else [tok.eos_token_id]

    def all_finished(done: bool) -> bool:
        flag = torch.tensor(0.0 if done else 1.0)
        dist.all_reduce(flag)
        return bool(flag == 0)

    with torch.no_grad():
        out = generate(model, tok, ids, torch.ones_like(ids), torch.rand(2, 12), max_new_tokens=12,
                       eos_token_ids=eos, all_finished=all_finished if synced else None)
    print(f"rank {rank} width {out.response_ids.shape[1]} ended {out.ended.tolist()} "
          f"tokens {int(out.response_mask.sum())}", flush=True)
    dist.destroy_process_group()
