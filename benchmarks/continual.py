"""Continual-learning benchmark; see dynamiclora.bench.continual."""

from dynamiclora.bench.continual import main

if __name__ == "__main__":
    main()
