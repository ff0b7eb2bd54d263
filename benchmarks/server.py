"""Serving benchmark; see dynamiclora.bench.server. Writes benchmarks/results/server-cpu.{json,md,png}."""

from dynamiclora.bench.server import main

if __name__ == "__main__":
    main()
