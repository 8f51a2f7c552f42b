"""Attention modules (pure: forward(x, state) -> (y, new_state))."""
