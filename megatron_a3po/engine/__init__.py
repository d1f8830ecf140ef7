"""CPU rollout engine: SGLang's native HTTP API (the subset an RL trainer uses) over HF transformers.

    python -m megatron_a3po.engine --model-path DIR --port P [--host 127.0.0.1] [--weight-version V]
        [--version-log FILE.jsonl] [--enable-test-hooks] [--threads 1] [--skip-tokenizer-init]

See server.py for the endpoints and scheduler.py for the batching/versioning model;
``launch.launch_engines`` starts local engine processes for tests, benches and the CPU demo.
"""
