"""PairGRPO engine for unified vision-language models (Janus-Pro). Imports pairuni_kernels, never the reverse."""
