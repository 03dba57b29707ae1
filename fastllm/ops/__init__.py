"""The op registry: every ``fastllm::`` op's schema, fake and autograd, one file per op family (no kernel imports)."""
