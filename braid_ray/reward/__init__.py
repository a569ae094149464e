"""Conservative reward models r_hat - g_hat, learned from D_off only."""
