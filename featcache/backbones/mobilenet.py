"""MobileNetV2 (Sandler et al., 2018); cut points are the expansions that start each resolution, and the top."""

from featcache.backbones.spec import BackboneSpec

MOBILENET_V2 = BackboneSpec(
    name="mobilenet_v2",
    application="keras.applications.mobilenet_v2.MobileNetV2",
    layers=("block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu", "out_relu"),
    default_layer="block_13_expand_relu",
    weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    preprocessing="keras.applications.mobilenet_v2.preprocess_input (tf: scaled to [-1, 1])",
    peak_bytes_per_pixel=4 * (3 + 3 * 96 // 4),   # block 1's 96-channel expansion at half size
)
