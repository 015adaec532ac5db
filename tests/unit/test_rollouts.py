"""Rollouts and RAFT's pieces: padding, stopping, seeding, worker shares, Ray roles, selection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lmforge.trainer.data import Example
from lmforge.trainer.data.formats import RecordCheck, parse_prompt
from lmforge.trainer.onpolicy import build_prompts, prompt_messages, round_prompts
from lmforge.trainer.recipes.raft import select_global, select_local
from lmforge.trainer.rollouts import (
    Sampling,
    cut_at_stop,
    generate,
    left_pad,
    ray_role,
    ray_start_command,
    worker_shares,
)


def test_left_pad_right_aligns_prompts() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_cut_at_stop_keeps_the_stop_token() -> None:
    assert cut_at_stop([4, 5, 2, 9, 9], [2, 3]) == ((4, 5, 2), True)
    assert cut_at_stop([4, 5, 6], [2]) == ((4, 5, 6), False)


def test_worker_shares_hand_out_whole_chunks() -> None:
    shares = worker_shares(prompts=10, batch_size=3, workers=2)
    assert shares == [range(0, 6), range(6, 10)]
    assert worker_shares(prompts=2, batch_size=4, workers=3) == [range(0, 2)]
    assert sum(len(s) for s in worker_shares(101, 8, 4)) == 101


def test_ray_roles_from_the_torchrun_environment() -> None:
    assert ray_role({}).role == "local"
    assert ray_role({"LOCAL_RANK": "1"}).role == "idle"
    assert ray_role({"RAY_ADDRESS": "ray://x:10001"}) == ray_role({"RAY_ADDRESS": "ray://x:10001"})
    assert ray_role({"RAY_ADDRESS": "ray://x:10001"}).role == "external"
    pod = {"NNODES": "3", "MASTER_ADDR": "job-0.job", "LOCAL_RANK": "0"}
    head = ray_role(pod | {"NODE_RANK": "0"})
    assert (head.role, head.address) == ("head", "job-0.job:6380")
    worker = ray_role(pod | {"NODE_RANK": "2", "LMFORGE_RAY_PORT": "7000"})
    assert (worker.role, worker.address) == ("worker", "job-0.job:7000")
    assert ray_role(pod | {"NODE_RANK": "1", "LOCAL_RANK": "1"}).role == "idle"
    assert "--head" in ray_start_command(head) and "--port=6380" in ray_start_command(head)
    assert "--address=job-0.job:7000" in ray_start_command(worker)
    assert all("--disable-usage-stats" in ray_start_command(r) for r in (head, worker))


def test_raft_selection_local_and_global() -> None:
    rewards = [[0.1, 0.9, 0.9], [0.5, 0.2, 0.0], [0.3, 0.8, 1.0]]
    assert select_local(rewards) == [(0, 1), (1, 0), (2, 2)]  # first best on ties
    assert select_global(rewards, 0.25) == [(0, 1), (0, 2), (2, 2)]  # ceil(9 / 4) = 3
    assert select_global(rewards, 0.01) == [(2, 2)]  # at least one


def test_round_prompts_are_all_or_a_fresh_sample_per_round() -> None:
    assert round_prompts(5, None, seed=1, index=0) == [0, 1, 2, 3, 4]
    first, second = round_prompts(100, 10, 1, 0), round_prompts(100, 10, 1, 1)
    assert len(first) == 10 and first != second
    assert first == round_prompts(100, 10, 1, 0)


def test_prompt_records_keep_their_columns_for_rewards() -> None:
    check = RecordCheck("p.jsonl", "line 1", [])
    example = parse_prompt({"prompt": "spell: 4 0", "answer": "four zero", "id": 7}, check)
    assert example is not None and check.ok
    assert dict(example.columns) == {"answer": "four zero", "id": 7}
    chat = Example(
        messages=(
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        )
    )
    assert prompt_messages(chat) == ({"role": "user", "content": "hi"},)


def test_build_prompts_gathers_columns(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = [
        Example(messages=({"role": "user", "content": "a"},), columns={"answer": "x"}),
        Example(messages=({"role": "user", "content": "b"},), columns={}),
    ]
    prompts = build_prompts(examples, tokenizer, None)
    assert prompts.columns == {"answer": ["x", None]}
    assert len(prompts) == 2 and all(prompts.ids)
    assert prompts.subset([1]).columns == {"answer": [None]}


def test_generation_is_seeded_per_chunk(tiny_model: Path) -> None:
    """The same seed gives the same samples whether prompts are generated in one call or in
    chunks handed to different workers (what lets Ray workers replace the local process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [tokenizer(f"spell: {d}")["input_ids"] for d in ("1 2", "3", "4 5 6", "7")]
    sampling = Sampling(samples_per_prompt=2, max_new_tokens=4, batch_size=2)
    whole = generate(model, tokenizer, prompts, sampling, seed=3)
    parts = generate(model, tokenizer, prompts[:2], sampling, 3) + generate(
        model, tokenizer, prompts[2:], sampling, 3, first_prompt=2
    )
    assert [[c.token_ids for c in g] for g in whole] == [[c.token_ids for c in g] for g in parts]
    assert [c.prompt_index for g in whole for c in g] == [0, 0, 1, 1, 2, 2, 3, 3]
    other = generate(model, tokenizer, prompts, sampling, seed=4)
    assert [[c.token_ids for c in g] for g in other] != [[c.token_ids for c in g] for g in whole]
    greedy = generate(model, tokenizer, prompts, sampling.greedy(), seed=0)
    assert all(len(g) == 1 for g in greedy)
    assert all(len(c.token_ids) <= 4 for g in whole for c in g)


@pytest.mark.parametrize(("precision", "computes_in"), [("bf16", "bfloat16"), ("fp32", "float32")])
def test_rollouts_sample_in_the_runs_compute_dtype(
    tiny_model: Path, precision: str, computes_in: str
) -> None:
    """Generation autocasts as the training forwards do (CPU bf16 autocast standing in for
    CUDA's): fp32 weights, bf16 matmuls; a fp32 run computes in fp32."""
    from lmforge.trainer.model import Precision
    from lmforge.trainer.rollouts import LocalRollouts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    seen: set[str] = set()
    model.lm_head.register_forward_hook(lambda m, i, out: seen.add(str(out.dtype)[6:]))
    engine = LocalRollouts(model, tokenizer, Precision(precision))
    prompts = [tokenizer("spell: 1 2")["input_ids"]]
    groups = engine.generate(prompts, Sampling(samples_per_prompt=2, max_new_tokens=3), seed=1)
    assert len(groups) == 1 and len(groups[0]) == 2
    assert seen == {computes_in}


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_select_global_keeps_the_best(fraction: float) -> None:
    rewards = [[0.0, 1.0], [0.5, 0.25]]
    kept = select_global(rewards, fraction)
    assert len(kept) == int(4 * fraction)
    assert min(rewards[i][j] for i, j in kept) >= max(
        (rewards[i][j] for i in range(2) for j in range(2) if (i, j) not in kept), default=-1
    )


def test_raft_and_ppo_refuse_a_generation_backend_they_do_not_have() -> None:
    import copy

    from lmforge.trainer.model import MethodError, Precision
    from lmforge.trainer.rollouts import rollout_engine

    from lmforge.api.runconfig import resolve_run_config
    from lmforge.api.validation import parse_object
    from tests.catalogue import BASE

    raw = copy.deepcopy(BASE["AlignmentJob"])
    raw["spec"]["method"] = {
        "type": "raft",
        "rewards": [{"rule": {"type": "regex", "pattern": "x"}}],
    }
    raw["spec"]["dataset"] = {"sources": [{"uri": "data/prompts.jsonl", "format": "prompt"}]}
    raw["spec"]["generation"] = {"backend": "vllm"}
    config = resolve_run_config(parse_object(raw), models={"model": "m"}, output="o")  # type: ignore[arg-type]
    with pytest.raises(MethodError, match=r"generation\.backend vllm"):
        rollout_engine(config, model=None, tokenizer=None, precision=Precision("fp32"))
