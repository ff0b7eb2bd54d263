"""Swarm benchmark; see dynamiclora.bench.swarm. Writes benchmarks/results/swarm-cpu.{json,md,png}."""

from dynamiclora.bench.swarm import main

if __name__ == "__main__":
    main()
