"""Memory-dynamics benchmark; see dynamiclora.bench.dynamics. Writes benchmarks/results/dynamics-cpu.{json,md}."""

from dynamiclora.bench.dynamics import main

if __name__ == "__main__":
    main()
