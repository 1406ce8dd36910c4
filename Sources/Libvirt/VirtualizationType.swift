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
    /// libvirt's domain capabilities alone: a host can offer KVM whose guests
    /// crawl or never boot (nested virtualisation without hardware support).
    /// It boots a tiny probe kernel that enters 64-bit mode and prints a
    /// marker, first under software emulation, then under KVM, and picks
    /// `kvm` only when KVM got there faster. Each probe's clock starts before
    /// its domain is created, and the KVM attempt is cut off once it is
    /// slower, so the whole probe ends within twice `timeout` plus the time
    /// libvirt takes to destroy the two probe guests.
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
        await removeStaleProbes()
        let emulated = await runProbe(virtType: "qemu", workDirectory: workDirectory, timeout: timeout)
        let kvm = await runProbe(virtType: "kvm", workDirectory: workDirectory, timeout: (try? emulated.get()) ?? timeout)
        switch (kvm, emulated) {
        case (.success(let kvmTime), .success(let emulatedTime)):
            return ResolvedVirtualization(
                type: .kvm, reason: "a probe guest ran in \(format(kvmTime)) under KVM, \(format(emulatedTime)) emulated")
        case (.success(let kvmTime), .failure(let emulatedFailure)):
            return ResolvedVirtualization(
                type: .kvm, reason: "a probe guest ran in \(format(kvmTime)) under KVM (emulated: \(emulatedFailure))")
        case (.failure(.timedOut), .success(let emulatedTime)):
            return ResolvedVirtualization(
                type: .qemu,
                reason: "KVM is offered but slower than software emulation: a probe guest that ran in \(format(emulatedTime)) emulated did not finish as fast under KVM")
        case (.failure(let kvmFailure), .success):
            return ResolvedVirtualization(type: .qemu, reason: "KVM is offered but \(kvmFailure): using software emulation")
        case (.failure(let kvmFailure), .failure):
            return ResolvedVirtualization(type: .qemu, reason: "KVM is offered but \(kvmFailure)")
        }
    }

    /// Boots the probe kernel under `virtType`; the time until its marker
    /// appeared, or why it did not within `timeout`.
    private func runProbe(virtType: String, workDirectory: URL, timeout: Duration) async -> Result<Duration, ProbeFailure> {
        let id = "\(getpid())-\(UUID().uuidString.lowercased().prefix(8))"
        let kernel = workDirectory.appendingPathComponent("probe-\(id).bin")
        let console = workDirectory.appendingPathComponent("probe-\(id).log")
        defer {
            try? FileManager.default.removeItem(at: kernel)
            try? FileManager.default.removeItem(at: console)
        }
        do {
            try FileManager.default.createDirectory(at: workDirectory, withIntermediateDirectories: true)
            try Data(KVMProbe.kernel).write(to: kernel)
            try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: kernel.path)
        } catch {
            return .failure(ProbeFailure("the probe kernel could not be written (\(error))"))
        }
        let xml = KVMProbe.domainXML(
            name: "\(KVMProbe.namePrefix)\(id)", virtType: virtType, kernel: kernel.path, console: console.path)
        let domain: Domain
        let started = ContinuousClock.now
        do {
            domain = try await createTransientDomain(xml: xml)
        } catch {
            return .failure(ProbeFailure("a probe guest did not start (\(error))"))
        }
        while ContinuousClock.now - started < timeout {
            if let output = try? String(contentsOf: console, encoding: .utf8), output.contains(KVMProbe.marker) {
                let elapsed = ContinuousClock.now - started
                try? await domain.destroy()
                return .success(elapsed)
            }
            try? await Task.sleep(for: .milliseconds(20))
        }
        try? await domain.destroy()
        return .failure(.timedOut(timeout))
    }

    /// Destroys probe guests left by processes that died mid-probe (a probe
    /// guest halts but keeps its QEMU process and memory until destroyed). Their names carry the prober's
    /// pid; only a local driver's pids can be checked.
    private func removeStaleProbes() async {
        guard uri.contains(":///") else { return }
        for domain in (try? await domains()) ?? [] where domain.name.hasPrefix(KVMProbe.namePrefix) {
            let pidText = domain.name.dropFirst(KVMProbe.namePrefix.count).prefix { $0 != "-" }
            guard let pid = pid_t(pidText), pid != getpid(), kill(pid, 0) != 0, errno == ESRCH else { continue }
            try? await domain.destroy()
        }
    }
}

private enum ProbeFailure: Error, CustomStringConvertible {
    case timedOut(Duration)
    case failed(String)

    init(_ description: String) { self = .failed(description) }

    var description: String {
        switch self {
        case .timedOut(let timeout): "a probe guest printed nothing within \(format(timeout))"
        case .failed(let description): description
        }
    }
}

private func format(_ duration: Duration) -> String {
    let (seconds, attoseconds) = duration.components
    return "\(seconds * 1000 + attoseconds / 1_000_000_000_000_000) ms"
}
