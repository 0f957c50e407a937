"""Monte Carlo EM: sampling E-steps (Gibbs, NUTS) and their schedules."""
