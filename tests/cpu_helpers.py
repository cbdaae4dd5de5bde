"""What torch.cpu.get_capabilities() reports on four kinds of CPU, for tests of the choices made from it (the
`cpu` fixture in conftest.py pretends to run on one)."""

SAPPHIRE_RAPIDS = {"architecture": "x86_64", "cpu_name": "Intel Xeon Platinum 8480+", "avx2": True,
                   "avx512_bf16": True, "amx_bf16": True}
AVX2_EPYC = {"architecture": "x86_64", "cpu_name": "AMD EPYC 7763", "avx2": True, "avx512_bf16": False}
APPLE_M1 = {"architecture": "arm64", "cpu_name": "Apple M1", "neon": True}  # Armv8.5: no BF16 instructions
GRAVITON3 = {"architecture": "aarch64", "cpu_name": "Neoverse-V1", "neon": True, "bf16": True}
