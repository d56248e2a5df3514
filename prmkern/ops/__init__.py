"""The seam to prmkern's C++ CPU kernels (csrc/, the extension `prmkern._C`): how the extension is found or built.

`extension.load()` is the one place that imports it. Nothing here decides when a kernel is used: the attention
backend, the models and the sampler do, from what the loaded module offers.
"""
