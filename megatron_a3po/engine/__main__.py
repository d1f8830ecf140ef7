from megatron_a3po.engine.server import main

main()
