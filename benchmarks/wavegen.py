"""WaveGen benchmark; see dynamiclora.bench.wavegen. Writes benchmarks/results/wavegen-cpu.{json,md,png}."""

from dynamiclora.bench.wavegen import main

if __name__ == "__main__":
    main()
