import CloudInit
import Foundation
import Libvirt
import Logging
import PoolAPI
import Support

extension Agent {
    // MARK: Reconciling and reports

    func reconcileLoop() async {
        while !Task.isCancelled {
            let instances = (try? await store.instances()) ?? []
            for instance in instances {
                do {
                    try await reconcile(instance.name)
                } catch is CancellationError {
                    return
                } catch {
                    logger.warning("cannot reconcile \(instance.name): \(error)", metadata: ["instance": "\(instance.name)"])
                }
            }
            // A boot is watched closely (its console decides when it is up);
            // the rest is driven by libvirt's events, with a slow sweep.
            let booting = instances.contains { $0.phase == .booting || $0.phase == .building }
            await reconcileWakeup.wait(timeout: booting ? .milliseconds(500) : .seconds(5))
        }
    }

    /// Compares an instance's record with its domain: moves a boot along,
    /// enforces its lease, and queues a report when what the pool should
    /// know changed. What to do is `Reconciliation`'s pure decision; this
    /// reads its inputs and carries it out.
    func reconcile(_ name: String) async throws {
        let decommission: Bool = try await locks.withLock(name) {
            guard let instance = try await self.store.instance(named: name),
                ![.building, .deleting].contains(instance.phase)
            else { return false }
            let now = Date()
            var domain: Domain? = nil
            do {
                domain = try await self.domain(of: instance)
            } catch let error as LibvirtError where error.code == .noDomain {}
            var domainState = try await domain?.state()
            // Only a boot looks at the console (it decides when the guest is up).
            let consoleSize =
                instance.phase == .booting
                ? (try? FileManager.default.attributesOfItem(atPath: try self.paths.console(name))[.size] as? NSNumber)?.intValue : nil
            let step = Reconciliation.step(
                Reconciliation.Observed(
                    phase: instance.phase, domain: domainState, expires: instance.expires, expiredAt: instance.expiredAt,
                    bootedAt: instance.bootedAt, consoleHasOutput: (consoleSize ?? 0) > 0, lastError: instance.lastError, now: now,
                    leaseGraceSeconds: self.configuration.leaseGraceSeconds, bootTimeoutSeconds: self.configuration.bootTimeoutSeconds))
            if let domain, !step.commands.isEmpty {
                for command in step.commands {
                    switch command {
                    case .suspend: try await domain.suspend()
                    case .destroy: _ = try? await domain.destroy()
                    }
                }
                domainState = try await domain.state()
            }
            if step.phase == .expired, instance.phase != .expired {
                self.logger.info("lease of \(name) ended; suspended, decommissioned in \(self.configuration.leaseGraceSeconds) s", metadata: ["instance": "\(name)"])
            }
            if step.cameUp {
                self.logger.info("\(name) is up", metadata: ["instance": "\(name)", "seconds": "\(now.timeIntervalSince(instance.bootedAt ?? now))"])
            }
            let view = Reconciliation.poolView(phase: step.phase, domain: domainState, lastError: step.lastError)
            var addresses: [IPAddress] = []
            if view.state == .running, let domain {
                addresses = ((try? await domain.interfaceAddresses()) ?? []).flatMap(\.addresses).map(Self.ipAddress)
                if addresses.isEmpty, case .user = self.configuration.network {
                    addresses = [IPAddress(version: 4, scope: "private", address: userGuestAddress)]
                }
            }
            // A running guest whose key list could not be set is in error too.
            let error = view.error ?? (view.state == .running ? instance.keysError : nil)
            let timeline = try await self.store.timeline(of: name)
            let reported = Reported(
                state: view.state, error: error, addresses: addresses, reason: view.reason, keysApplied: instance.keysApplied,
                phases: Reported.agentPhases(timeline))
            let changed = self.state.withLock { $0.reported[name] != reported }
            // Only the fields reconciling owns are written, and only if no
            // action changed the phase meanwhile (a delete, a lease): a
            // whole-record save would undo what others wrote since the read.
            let kept = try await self.store.reconciled(
                name, from: instance.phase, to: step.phase, state: step.decommission ? instance.state : view.state,
                lastError: view.error, expiredAt: step.expiredAt)
            guard kept else { return false }
            if step.phase == .active, instance.keysPending { self.startRekey(name) }
            guard changed, !step.decommission else { return step.decommission }
            var ssh: SSHEndpoint?
            if view.state == .running {
                if let port = instance.sshPort {
                    ssh = SSHEndpoint(host: self.configuration.publicAddress ?? "127.0.0.1", port: port)
                } else if let address = addresses.first(where: { $0.version == 4 }) ?? addresses.first, !self.configuration.isUserNetwork {
                    ssh = SSHEndpoint(host: address.address, port: 22)
                }
            }
            let report = InstanceReport(
                name: name, state: view.state, flavor: instance.flavor, expires: instance.expires.map { Int($0.timeIntervalSince1970) },
                ipAddresses: addresses, consoleOutput: self.consoleTail(name), error: error,
                reason: view.reason, timeline: timeline, ssh: ssh, keysApplied: instance.keysApplied)
            try await self.store.enqueue(report, at: now)
            self.state.withLock { $0.reported[name] = reported }
            self.logger.info("\(name): \(view.state)\(error.map { " (\($0))" } ?? "")", metadata: ["instance": "\(name)"])
            self.outboxWakeup.signal()
            return false
        }
        if decommission { startDecommission(name) }
    }

    static func ipAddress(_ address: InterfaceAddresses.Address) -> IPAddress {
        let text = address.address.lowercased()
        let isPrivate: Bool
        switch address.family {
        case .ipv4:
            let octets = text.split(separator: ".").compactMap { Int($0) }
            isPrivate =
                octets.count == 4
                && (octets[0] == 10 || octets[0] == 127 || (octets[0] == 172 && (16...31).contains(octets[1]))
                    || (octets[0] == 192 && octets[1] == 168) || (octets[0] == 169 && octets[1] == 254)
                    || (octets[0] == 100 && (64...127).contains(octets[1])))
        case .ipv6:
            isPrivate = text.hasPrefix("fc") || text.hasPrefix("fd") || text.hasPrefix("fe8") || text.hasPrefix("fe9")
                || text.hasPrefix("fea") || text.hasPrefix("feb") || text == "::1"
        }
        return IPAddress(version: address.family == .ipv4 ? 4 : 6, scope: isPrivate ? "private" : "public", address: address.address)
    }

    /// The newest lines of the instance's serial console.
    func consoleTail(_ name: String) -> [String] {
        let limit = configuration.consoleTailLines
        guard limit > 0, let path = try? paths.console(name), let handle = FileHandle(forReadingAtPath: path) else { return [] }
        defer { try? handle.close() }
        let size = (try? handle.seekToEnd()) ?? 0
        // At most 128 KiB of console: even escaped as JSON (\u001b is six
        // bytes for one), a report stays within the pool's 1 MiB body limit.
        let window = UInt64(min(128 * 1024, max(4096, limit * 200)))
        try? handle.seek(toOffset: size > window ? size - window : 0)
        let data = (try? handle.readToEnd()) ?? Data()
        var lines = String(decoding: data, as: UTF8.self)
            .replacingOccurrences(of: "\r", with: "")
            .split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        if size > window, !lines.isEmpty { lines.removeFirst() }  // most likely cut in half
        if lines.last == "" { lines.removeLast() }
        return Array(lines.suffix(limit))
    }
}
