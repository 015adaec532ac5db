"""Rollouts of our online recipes (raft, ppo): K sampled responses per prompt from the policy.

One process generates with transformers' `generate` itself (batched, left padding, seeded).
With `generation.workers > 1` the prompts are spread over a pool of Ray actors, each with its
own copy of the policy; before every round the trainer sends them its trainable weights
through Ray's object store. Locally Ray starts in-process; on a cluster the job's pods form
the Ray cluster, node rank 0 (the trainer) being its head (`ray_role`).

Every chunk of `batch_size` prompts is sampled under its own seed, derived from the round's
seed and the chunk's position, and the pool hands out whole chunks: the same weights, prompts
and seed give the same responses on one process or on any number of workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from lmforge.trainer.launch import node_rank
from lmforge.trainer.model import MethodError, Precision
from lmforge.trainer.policy import (
    load_policy,
    load_trainable_state,
    policy_precision,
    trainable_state,
)

from lmforge.api.kinds import GenerationSpec
from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)

RAY_PORT_ENV = "LMFORGE_RAY_PORT"
DEFAULT_RAY_PORT = 6380  # not Ray's 6379: nothing else in the pod should answer there


@dataclass(frozen=True)
class Completion:
    """One sampled response."""

    prompt_index: int  # position of its prompt in the list passed to `generate`
    token_ids: tuple[int, ...]  # generated tokens, up to and including the stop token
    text: str  # decoded, special tokens left out
    finished: bool  # ended with a stop token (not cut by max_new_tokens)


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled."""

    samples_per_prompt: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    batch_size: int = 16  # prompts per generate call

    @classmethod
    def of(cls, generation: GenerationSpec, batch_size: int = 16) -> Sampling:
        return cls(
            samples_per_prompt=generation.samples_per_prompt,
            max_new_tokens=generation.max_new_tokens,
            temperature=generation.temperature,
            top_p=generation.top_p,
            batch_size=batch_size,
        )

    def greedy(self) -> Sampling:
        """One deterministic response per prompt (held-out evaluation)."""
        return replace(self, samples_per_prompt=1, temperature=0.0)


# ---------------------------------------------------------------- pure pieces


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every prompt right-aligned (generation appends)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if prompt:
            ids[i, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
    return ids, mask


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[tuple[int, ...], bool]:
    """The generated tokens up to and including the first stop token; whether one was found."""
    stops = set(stop_ids)
    for i, token in enumerate(ids):
        if token in stops:
            return tuple(ids[: i + 1]), True
    return tuple(ids), False


def chunk_seed(seed: int, first_prompt: int) -> int:
    """The sampling seed of the chunk starting at prompt `first_prompt`."""
    return (seed * 1_000_003 + first_prompt) % (2**63)


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """EOS, the end-of-turn marker of ChatML-style templates, and the model's own stop ids."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(configured)
    return sorted(i for i in ids if isinstance(i, int))


def worker_shares(prompts: int, batch_size: int, workers: int) -> list[range]:
    """Contiguous prompt ranges, whole chunks of `batch_size` each, for `workers` workers."""
    chunks = -(-prompts // batch_size)
    per_worker, extra = divmod(chunks, workers)
    shares, start = [], 0
    for w in range(workers):
        count = (per_worker + (w < extra)) * batch_size
        shares.append(range(start, min(start + count, prompts)))
        start = min(start + count, prompts)
    return [s for s in shares if len(s)]


# ---------------------------------------------------------------- generation


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    seed: int,
    first_prompt: int = 0,
    precision: Precision | None = None,
) -> list[list[Completion]]:
    """`sampling.samples_per_prompt` responses to each prompt (token ids), in prompt order.

    `first_prompt` is the position of prompts[0] in the whole round (chunk seeds). Under
    the run's `precision` the policy samples in the compute dtype its training forwards
    (and PPO's log-probabilities of these samples) use; without one, in its weights' dtype."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, model)
    k = sampling.samples_per_prompt
    sample = sampling.temperature > 0
    options: dict[str, Any] = {"do_sample": sample}
    if sample:
        options |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    out: list[list[Completion]] = []
    devices = [device.index or 0] if device.type == "cuda" else []
    for start in range(0, len(prompts), sampling.batch_size):
        batch = prompts[start : start + sampling.batch_size]
        ids, mask = left_pad(batch, pad)
        autocast = precision.autocast(device) if precision else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), autocast:
            torch.manual_seed(chunk_seed(seed, first_prompt + start))
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=k,
                eos_token_id=stops,
                pad_token_id=pad,
                **options,
            )
        new = generated[:, ids.shape[1] :].tolist()
        for i in range(len(batch)):
            group = []
            for j in range(k):
                tokens, finished = cut_at_stop(new[i * k + j], stops)
                text = tokenizer.decode(list(tokens), skip_special_tokens=True)
                group.append(Completion(first_prompt + start + i, tokens, text, finished))
            out.append(group)
    model.train(was_training)
    return out


class LocalRollouts:
    """Generation by the training process itself (generation.workers 1)."""

    def __init__(self, model: Any, tokenizer: Any, precision: Precision) -> None:
        self.model, self.tokenizer, self.precision = model, tokenizer, precision

    def sync(self, model: Any) -> None:
        """Nothing to do: this is the policy being trained."""

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int
    ) -> list[list[Completion]]:
        return generate(self.model, self.tokenizer, prompts, sampling, seed, 0, self.precision)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- Ray


RayRoleName = Literal["external", "local", "head", "worker", "idle"]


@dataclass(frozen=True)
class RayRole:
    """What this training process does in the Ray cluster of a job with rollout workers."""

    role: RayRoleName
    address: str | None = None  # the head's host:port (head, worker), RAY_ADDRESS (external)


def ray_role(env: Mapping[str, str]) -> RayRole:
    """Decide from the torchrun environment (the operator's) what this process does.

    - RAY_ADDRESS set: connect to that existing cluster ("external").
    - one node: rank 0 starts Ray in-process ("local"); other local ranks have nothing to do.
    - several nodes (pods): node rank 0 starts the head at MASTER_ADDR and trains ("head");
      local rank 0 of every other node joins it as a worker node ("worker") and serves the
      actors Ray places there until the head is gone; other local ranks are "idle".
    """
    if env.get("RAY_ADDRESS"):
        return RayRole("external", env["RAY_ADDRESS"])
    nodes = int(env.get("NNODES", "1"))
    node = node_rank(env)
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if local_rank != 0:
        return RayRole("idle")
    if nodes <= 1:
        return RayRole("local")
    port = env.get(RAY_PORT_ENV, str(DEFAULT_RAY_PORT))
    address = f"{env.get('MASTER_ADDR', '127.0.0.1')}:{port}"
    return RayRole("head" if node == 0 else "worker", address)


def ray_start_command(role: RayRole) -> list[str]:
    """`ray start` for a head or worker node of a job's Ray cluster (no dashboard, no usage
    reporting)."""
    assert role.address is not None and role.role in ("head", "worker")
    ray = shutil.which("ray") or "ray"
    common = ["--disable-usage-stats"]
    if role.role == "head":
        port = role.address.rsplit(":", 1)[1]
        return [ray, "start", "--head", f"--port={port}", "--include-dashboard=false", *common]
    return [ray, "start", f"--address={role.address}", *common]


def _reachable(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return True
    except OSError:
        return False


def serve_as_ray_worker(role: RayRole, poll_seconds: float = 10) -> None:
    """Join the head's Ray cluster and keep this node in it until the head is gone
    (the trainer on node rank 0 finished), then leave cleanly (exit code 0 for the pod)."""
    assert role.role == "worker" and role.address is not None
    deadline = time.monotonic() + 600
    while not _reachable(role.address):  # the head pod may still be starting
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray head {role.address} did not come up within 10 minutes")
        time.sleep(2)
    subprocess.run(ray_start_command(role), check=True)
    log.info("joined the Ray cluster at %s as a rollout node", role.address)
    try:
        while _reachable(role.address):
            time.sleep(poll_seconds)
    finally:
        subprocess.run([shutil.which("ray") or "ray", "stop"], check=False)


def _start_ray(role: RayRole, workers: int) -> bool:
    """Connect this process to Ray as its role says; True when it started Ray itself."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home
    if ray.is_initialized():
        return False
    if role.role == "external":
        ray.init(address=role.address, configure_logging=False)
        return False
    if role.role == "head":
        subprocess.run(ray_start_command(role), check=True)
        ray.init(address="auto", configure_logging=False)
        return True
    # In-process: a local cluster with one CPU slot per worker, on the loopback only.
    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    return True


class _RolloutActor:
    """One rollout worker: a copy of the policy (made as the trainer made its own)."""

    def __init__(self, config_wire: dict[str, Any]) -> None:
        from lmforge.trainer.policy import load_policy_tokenizer

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        config = RunConfig.model_validate(config_wire)
        self.tokenizer = load_policy_tokenizer(config)
        self.precision = policy_precision(config)
        self.model = load_policy(config, self.precision)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.model, state)

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, seed: int, first_prompt: int
    ) -> list[list[Completion]]:
        return generate(
            self.model, self.tokenizer, prompts, sampling, seed, first_prompt, self.precision
        )


class RayRollouts:
    """A pool of Ray actors generating rollouts with copies of the policy."""

    def __init__(self, config: RunConfig, workers: int, role: RayRole) -> None:
        import ray

        self.ray = ray
        self.started = _start_ray(role, workers)
        gpus = float(ray.cluster_resources().get("GPU", 0))
        actor = ray.remote(_RolloutActor).options(  # type: ignore[attr-defined]
            num_cpus=1, num_gpus=min(1.0, gpus / workers) if gpus else 0
        )
        self.actors = [actor.remote(config.to_wire()) for _ in range(workers)]
        log.info("%d Ray rollout workers started", workers)

    def sync(self, model: Any) -> None:
        """Send the policy's trainable weights to every worker (one copy in the object store)."""
        state = self.ray.put(trainable_state(model))
        self.ray.get([a.load.remote(state) for a in self.actors])

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int
    ) -> list[list[Completion]]:
        shares = worker_shares(len(prompts), sampling.batch_size, len(self.actors))
        futures = [
            actor.generate.remote([list(prompts[i]) for i in share], sampling, seed, share.start)
            for actor, share in zip(self.actors, shares, strict=False)
        ]
        return [group for part in self.ray.get(futures) for group in part]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


def rollout_engine(
    config: RunConfig,
    model: Any,
    tokenizer: Any,
    precision: Precision,
    env: Mapping[str, str] = os.environ,
) -> LocalRollouts | RayRollouts:
    """Where rollouts are generated: here, or on `generation.workers` Ray actors (which
    resolve the run's precision themselves)."""
    assert hasattr(config.spec, "generation")
    if config.spec.generation.backend != "transformers":
        raise MethodError(
            f"generation.backend {config.spec.generation.backend}: {config.spec.objective} "
            "generates with transformers (set generation.backend: transformers)"
        )
    workers = config.spec.generation.workers
    if workers <= 1:
        return LocalRollouts(model, tokenizer, precision)
    return RayRollouts(config, workers, ray_role(env))
