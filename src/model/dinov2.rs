//! DINOv2 ViT/14 encoder (transformers Dinov2Model layout) (to be written).
