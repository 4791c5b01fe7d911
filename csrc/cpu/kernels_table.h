// The kernel table (kernels.h) of one instruction set: included by kernels.cpp inside that set's
// namespace, after kernels_impl.h and outside its target pragma, so that building the table (it
// only takes addresses) runs no AVX-512 code on a CPU without it.  Every entry is named (C++20
// designated initialisers): the designators must follow the order of kernels.h or this does not
// compile, and an entry left out would be null, so all are listed.

template <typename S>
Kernels<S> table(const char* isa) {
  return {
      .isa = isa,
      .panel_width = panel_width<S>(),
      .lanes = lanes<S>(),
      .spmm =
          {
              .tile_from_rows = &tile_from_rows<S>,
              .tile_to_rows = &tile_to_rows<S>,
              .tile_from_bf16 = &tile_from_rows<S, bf16>,
              .tile_to_bf16 = &tile_to_rows<S, bf16>,
              .panel_csr = {&panel_csr<S, 2>, &panel_csr<S, 4>, &panel_csr<S, 6>, &panel_csr<S, 8>},
              .panel_csr_packed = {&panel_csr_packed<S, 2>, &panel_csr_packed<S, 4>, &panel_csr_packed<S, 6>,
                                   &panel_csr_packed<S, 8>},
              .panel_bsr = &panel_bsr<S>,
              .sddmm_tile = {&sddmm_tile<S, 4>, &sddmm_tile<S, 6>, &sddmm_tile<S, 8>, &sddmm_tile<S, 16>},
          },
      .linear =
          {
              .strips_from_rows = &strips_from_rows<S>,
              .bsr_dw_rows = &bsr_dw_rows<S>,
              .panel_win = {&panel_win<S, 2>, &panel_win<S, 4>, &panel_win<S, 8>},
              .sddmm_win = {&sddmm_win<S, 4>, &sddmm_win<S, 8>, &sddmm_win<S, 16>},
          },
      .conv2d =
          {
              .im2col_tile = &im2col_tile<S>,
              .col2im_tile = &col2im_tile<S>,
              .conv_out_tile = &conv_out_tile<S>,
              .conv_in_tile = &conv_in_tile<S>,
              .direct_panel = {&direct_panel<S, 2>, &direct_panel<S, 4>, &direct_panel<S, 8>},
              .direct_sddmm = {&direct_sddmm<S, 4>, &direct_sddmm<S, 8>, &direct_sddmm<S, 16>},
              .direct_panel4 = {&direct_panel4<S, 2>, &direct_panel4<S, 4>},
          },
      .dwconv2d =
          {
              .dw_fwd_plane = &dw_fwd_plane<S>,
              .dw_dx_plane = &dw_dx_plane<S>,
              .dw_dw_row = &dw_dw_row<S>,
          },
  };
}
