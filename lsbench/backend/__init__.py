"""Backend: loading models and the early-exit adapter over them."""
