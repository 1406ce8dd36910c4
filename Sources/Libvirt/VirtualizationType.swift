import Foundation

/// Which virtualisation type domains are defined with.
public enum VirtualizationType: String, Sendable, Hashable, CaseIterable, Codable, CustomStringConvertible {
    /// KVM when a probe guest proves it works, otherwise `qemu`.
    case auto
    /// Hardware virtualisation through /dev/kvm.
    case kvm
    /// Software emulation (QEMU's TCG): slower, works everywhere.
    case qemu

    public var description: String { rawValue }
}

/// The outcome of resolving a ``VirtualizationType`` setting.
public struct ResolvedVirtualization: Sendable, Hashable {
    /// `kvm` or `qemu`, never `auto`.
    public var type: VirtualizationType
    /// Why, in words for a log line or an operator.
    public var reason: String
}

extension Connection {
    /// Resolves a setting to `kvm` or `qemu`.
    ///
    /// `kvm` and `qemu` are taken as configured. `auto` does not trust
    /// libvirt's domain capabilities alone (a host can offer KVM whose guests
    /// never run): it boots a tiny probe kernel under KVM and picks `kvm`
    /// only if the kernel's serial output appears within `timeout`. Anything
    /// else falls back to `qemu` within that bound.
    ///
    /// - Parameter workDirectory: a directory the hypervisor can read and
    ///   write, for the probe kernel and its console file.
    public func resolveVirtualization(
        _ setting: VirtualizationType, workDirectory: URL, timeout: Duration = .seconds(10)
    ) async -> ResolvedVirtualization {
        switch setting {
        case .kvm, .qemu:
            return ResolvedVirtualization(type: setting, reason: "configured as \(setting)")
        case .auto:
            break
        }
        do {
            _ = try await domainCapabilities(virtType: "kvm")
        } catch {
            return ResolvedVirtualization(type: .qemu, reason: "libvirt offers no KVM here (\(error))")
        }
        return await probeKVM(workDirectory: workDirectory, timeout: timeout)
    }

    private func probeKVM(workDirectory: URL, timeout: Duration) async -> ResolvedVirtualization {
        let id = UUID().uuidString.lowercased().prefix(8)
        let kernel = workDirectory.appendingPathComponent("kvm-probe-\(id).bin")
        let console = workDirectory.appendingPathComponent("kvm-probe-\(id).log")
        defer {
            try? FileManager.default.removeItem(at: kernel)
            try? FileManager.default.removeItem(at: console)
        }
        do {
            try FileManager.default.createDirectory(at: workDirectory, withIntermediateDirectories: true)
            try Data(KVMProbe.kernel).write(to: kernel)
            try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: kernel.path)
        } catch {
            return ResolvedVirtualization(type: .qemu, reason: "could not write the KVM probe kernel: \(error)")
        }
        let xml = KVMProbe.domainXML(name: "corral-kvm-probe-\(id)", kernel: kernel.path, console: console.path)
        let started = ContinuousClock.now
        let domain: Domain
        do {
            domain = try await createTransientDomain(xml: xml)
        } catch {
            return ResolvedVirtualization(type: .qemu, reason: "a KVM probe guest did not start (\(error))")
        }
        defer { Task { try? await domain.destroy() } }
        while ContinuousClock.now - started < timeout {
            if let output = try? String(contentsOf: console, encoding: .utf8), output.contains(KVMProbe.marker) {
                try? await domain.destroy()
                let elapsed = (ContinuousClock.now - started).formatted(.units(allowed: [.milliseconds]))
                return ResolvedVirtualization(type: .kvm, reason: "a KVM probe guest ran (\(elapsed))")
            }
            try? await Task.sleep(for: .milliseconds(100))
        }
        try? await domain.destroy()
        return ResolvedVirtualization(
            type: .qemu,
            reason: "KVM is offered but a probe guest printed nothing in \(timeout.formatted(.units(allowed: [.seconds]))); using software emulation"
        )
    }
}

/// A multiboot kernel of a few dozen bytes that writes ``marker`` to the
/// first serial port and halts: proof that guest code runs.
enum KVMProbe {
    static let marker = "corral-kvm-probe-ok"

    /// Load address and layout: a 32-byte multiboot header with the a.out
    /// kludge (flag 16: the header gives the load addresses), code at 0x20,
    /// the message at 0x34.
    static let kernel: [UInt8] = {
        let load: UInt32 = 0x0010_0000
        let magic: UInt32 = 0x1BAD_B002
        let flags: UInt32 = 0x0001_0000
        let checksum = 0 &- (magic &+ flags)
        var bytes: [UInt8] = []
        func word(_ value: UInt32) { withUnsafeBytes(of: value.littleEndian) { bytes += $0 } }
        // header: magic, flags, checksum, header_addr, load_addr,
        // load_end_addr (0: whole file), bss_end_addr (0: none), entry_addr
        for value in [magic, flags, checksum, load, load, 0, 0, load + 0x20] { word(value) }
        bytes += [0x66, 0xBA, 0xF8, 0x03]  // 0x20 mov dx, 0x3f8 (COM1)
        bytes += [0xBE]  // 0x24 mov esi, message
        word(load + 0x34)
        bytes += [0xAC]  // 0x29 lodsb
        bytes += [0x84, 0xC0]  // 0x2a test al, al
        bytes += [0x74, 0x03]  // 0x2c jz halt
        bytes += [0xEE]  // 0x2e out dx, al
        bytes += [0xEB, 0xF8]  // 0x2f jmp lodsb
        bytes += [0xF4]  // 0x31 halt: hlt
        bytes += [0xEB, 0xFD]  // 0x32 jmp halt
        bytes += Array("\(marker)\n".utf8) + [0]  // 0x34
        return bytes
    }()

    static func domainXML(name: String, kernel: String, console: String) -> String {
        """
        <domain type='kvm'>
          <name>\(name)</name>
          <memory unit='MiB'>32</memory>
          <vcpu>1</vcpu>
          <os>
            <type arch='x86_64'>hvm</type>
            <kernel>\(escapeXMLAttribute(kernel))</kernel>
          </os>
          <on_poweroff>destroy</on_poweroff>
          <on_reboot>destroy</on_reboot>
          <on_crash>destroy</on_crash>
          <devices>
            <serial type='file'>
              <source path='\(escapeXMLAttribute(console))'/>
              <target port='0'/>
            </serial>
          </devices>
        </domain>
        """
    }
}
