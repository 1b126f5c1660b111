"""Everything that names SGLang: the L3 adapter, page geometry, page coding on a device,
stats, the plugin, ``speckv serve``, the CPU-engine fixes and the version pin. An SGLang
upgrade touches this folder alone."""
