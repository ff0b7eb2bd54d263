"""Persistence benchmark; see dynamiclora.bench.persistence. Writes benchmarks/results/persistence-cpu.*."""

from dynamiclora.bench.persistence import main

if __name__ == "__main__":
    main()
