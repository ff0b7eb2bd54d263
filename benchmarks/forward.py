"""Forward-pass benchmark; see dynamiclora.bench.forward. Writes benchmarks/results/forward-<device>.{json,md,png}."""

from dynamiclora.bench.forward import main

if __name__ == "__main__":
    main()
