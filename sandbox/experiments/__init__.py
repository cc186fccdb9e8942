"""The seeds' experiments, run in real guests under the sandbox.

``sandbox experiment NAME`` (:mod:`sandbox.cli.experiment`) runs one; each
module here is one experiment (an :class:`~sandbox.experiments.base.Experiment`
named ``EXPERIMENT``), :mod:`~sandbox.experiments.registry` lists them and
writes their files, :mod:`~sandbox.experiments.common` holds the guest-run
helpers and :mod:`~sandbox.experiments.plotting` the matplotlib set-up.

=================  ===============================================================
``msr_bitmap``     TSC_AUX written per system call, MSRPM bit set vs clear
``virtio_io``      console payload through the 16550 vs a virtio-mmio console
``io_notice``      trap every device access vs grant + Dirty-bit polling (uses ``io_dirty``)
``walk_refs``      2-D walk references for every pair of guest and nested page sizes
``asid_flush``     ASID-tagged TLB vs flush on world switch, per pages touched
``shadow_nested``  shadow vs nested paging on ``guest_images/kernel.S``
``avic_irq``       a device's interrupts: injection (an exit per interrupt and EOI) vs AVIC
``exit_model``     lambda = lambda_cpu + lambda_io, pre-2008 vs modern feature sets
``popek_goldberg`` sensitive instructions in classic trap-and-emulate and under SVM
``nested_tsc``     T_L2 = T_H + d1 + d2 read at each level of an L1/L2 pair
=================  ===============================================================
"""
