"""One actor update on a fixed batch, on however many ranks this runs as (a helper of test_distributed.py).

    python tests/rlcore/dist_update_worker.py OUT STRATEGY                # one process
    torchrun --nproc_per_node 2 tests/rlcore/dist_update_worker.py OUT STRATEGY

Every rank builds the same model and the same 8-sample batch and keeps its contiguous share of the
groups; rank 0 writes the metrics and the full parameters after the update to OUT. PACKING=0 trains on
right-padded micro-batches instead of packed ones.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from rlcore import dist  # noqa: E402
from rlcore.actor import Actor  # noqa: E402
from rlcore.batch import TrainBatch  # noqa: E402
from rlcore.config import RLConfig  # noqa: E402
from rlcore import logprobs  # noqa: E402
from rlcore.logprobs import ResponseScorer, response_logprobs  # noqa: E402
from rlcore.models import tiny_model  # noqa: E402
from rlcore.sharding import full_tensor, shard  # noqa: E402


def batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    prompts = [[3 + i, 4 + i, 5] for i in range(4) for _ in range(2)]  # 4 groups of 2 samples
    lengths = [5, 2, 7, 3, 6, 6, 1, 4]
    T = max(lengths)
    ids = torch.randint(2, vocab, (8, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3])[:, None] * mask
    return prompts, ids * mask.long(), mask, advantages


def main(out: str, strategy: str) -> None:
    torch.manual_seed(0)
    logprobs.HEAD_CHUNK_TOKENS = 4  # several head chunks per micro-batch: recomputed in backward under FSDP
    dist.init("cpu")
    world, rank = dist.world_size(), dist.rank()
    model = tiny_model(40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, seed=0)
    prompts, ids, mask, advantages = batch(40)
    with torch.no_grad():
        old, _ = response_logprobs(model, prompts, ids, mask, temperature=1.0, pad_id=0)
    old = old - 0.05 * mask  # off-policy a little, so ratios and clipping matter
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    if os.environ.get("NAN_RANK") == str(rank):  # this rank alone computes a NaN loss
        advantages = advantages.clone()
        advantages[rows.start, 0] = float("nan")
    mine = TrainBatch(prompts[rows], ids[rows], mask[rows], old[rows], None, advantages[rows])
    cfg = RLConfig()
    cfg.train.lr, cfg.train.max_tokens_per_microbatch = 1e-3, 20  # several micro-batches per rank
    cfg.algo.aggregation = os.environ.get("AGG", "token-mean")
    cfg.algo.entropy_coef = 0.01
    cfg.train.packing = os.environ.get("PACKING", "1") == "1"  # 0: right-padded micro-batches
    scorer = ResponseScorer(model)
    if world > 1:
        shard(scorer, model, strategy=strategy, device="cpu")
    actor = Actor(model, cfg, pad_id=0, seqs_per_minibatch=len(mine), scorer=scorer)
    initial = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}
    metrics, _ = actor.update(mine)
    metrics = dist.reduce_metrics(metrics)
    params = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}
    skipped = metrics["actor/skipped_steps"] > 0  # a skipped step drops its gradients
    grads = {} if skipped else {n: full_tensor(p.grad).clone() for n, p in model.named_parameters()}  # summed
    # The updated policy's log-probs of this rank's rows (computed wherever rlcore.balance sends them).
    after = torch.cat(dist.gather_objects(actor.logprobs(mine.prompt_ids, mine.response_ids, mine.mask)[0]))
    if dist.is_main():
        torch.save({"metrics": metrics, "params": params, "grads": grads, "initial": initial, "logprobs": after}, out)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    dist.exit_rank(0)
