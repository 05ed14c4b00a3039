"""`gptrain bench`: step timing against the plain PyTorch reference and llm.c."""
