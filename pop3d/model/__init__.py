"""The POP-3D student: TPVFormer-04 with POP-3D's occupancy and language heads."""
from .config import StudentConfig
from .msda import multi_scale_deformable_attn
from .tpvformer import StudentOutput, TPVFormer

__all__ = ["StudentConfig", "StudentOutput", "TPVFormer", "multi_scale_deformable_attn"]
