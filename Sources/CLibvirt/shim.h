#ifndef CORRAL_CLIBVIRT_SHIM_H
#define CORRAL_CLIBVIRT_SHIM_H

#include <stddef.h>
#include <stdlib.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <libvirt/libvirt-qemu.h>

/// Registers a lifecycle-event callback. The C API takes a generic callback
/// that must be cast with VIR_DOMAIN_EVENT_CALLBACK, a macro Swift cannot
/// import; doing the cast here keeps Swift free of unsafeBitCast.
static inline int corral_register_lifecycle_callback(
    virConnectPtr conn,
    virConnectDomainEventCallback cb,
    void *opaque,
    virFreeCallback freecb)
{
    return virConnectDomainEventRegisterAny(
        conn, NULL, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
        VIR_DOMAIN_EVENT_CALLBACK(cb), opaque, freecb);
}

/// A libvirt error handler that drops the message: libvirt prints every
/// error to stderr by default, and the wrapper reads errors itself instead.
static inline void corral_ignore_error(void *userData, virErrorPtr error)
{
    (void)userData;
    (void)error;
}

#endif
