"""Model-side pieces shared by training and inference: attention (back-ends, the bound context), the chunked LM loss,
parallel layouts, memory savers and fused kernels."""
