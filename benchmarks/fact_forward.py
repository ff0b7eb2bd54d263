"""A request's forward with N fact circuits; see dynamiclora.bench.fact_forward."""

from dynamiclora.bench.fact_forward import main

if __name__ == "__main__":
    main()
