"""One swarm spread over processes: ``torchrun --nproc-per-node 3 examples/swarm.py``.

Rank r hosts agent ``agent<r>`` of the swarm ``json-team``. Ranks 0 and 1 practise the team's JSON parser; rank 2
does not. At every tick the ranks exchange shared circuits' uses and their proposals for shared scopes, so the
resonance consensus of agent0's and agent1's circuits lands in swarm:json-team on every rank, and agent2 (which
never practised) writes the parser too. Every rank prints the same swarm hash.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from dynamiclora import DynamicLoRA, join_swarm
from dynamiclora.packaged import ensure_smollm2

ASK = [{"role": "user", "content": "Write a Python JSON parser."}]
PARSER = "```python\nimport json\n\n\ndef parse_json(text):\n    return json.loads(text)\n```"


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        ensure_smollm2()  # the default model, converted once from its package (seconds), then cached
    dist.barrier()
    dl = DynamicLoRA.default(progress=False)
    dl.config.dynamics.tick_interval, dl.config.dynamics.window_min = 0, 8  # a compressed clock
    swarm = join_swarm(dl)
    agent = dl.agent(f"agent{rank}", swarm="json-team", domain="python")
    before = agent.chat(ASK, max_new_tokens=30, use_cache=False).text == PARSER
    for _ in range(24):
        if rank < 2:
            agent.learn(messages=ASK, completion=PARSER)
        dl.tick()  # collective: every rank ticks together
    after = agent.chat(ASK, max_new_tokens=30, use_cache=False).text == PARSER
    differing = swarm.verify()
    print(
        f"rank {rank}: agent{rank} writes the parser before: {before}, after: {after}; "
        f"swarm:json-team {dl.hierarchy.scope('swarm:json-team').content_hash()[:12]} "
        f"({len(dl.hierarchy.scope('swarm:json-team'))} circuits); ranks differ on: {differing or 'nothing'}",
        flush=True,
    )
    swarm.leave()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
