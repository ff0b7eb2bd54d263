"""Gate reach among taught facts; see dynamiclora.bench.reach."""

from dynamiclora.bench.reach import main

if __name__ == "__main__":
    main()
