"""Training a DDPM with Algorithm 1 (L_simple), and the datasets it reads."""
