"""Knowledge-editing benchmark; see dynamiclora.bench.editing."""

from dynamiclora.bench.editing import main

if __name__ == "__main__":
    main()
