import CloudInit
import Foundation
import Libvirt
import Logging
import PoolAPI
import Support

extension Agent {
    // MARK: Check-ins and actions

    func checkInLoop() async throws {
        var backoff = Backoff()
        var authorized = false
        while !Task.isCancelled {
            do {
                if !authorized {
                    let identity = try await client.authorize()
                    state.withLock { $0.applianceName = identity.name }
                    logger.info("authorized as appliance \(identity.name) of \(identity.owner) at \(configuration.poolURL)")
                    let flavors = try await client.flavors()
                    logger.info("the pool offers flavors: \(flavors.map(\.name).joined(separator: ", "))")
                    authorized = true
                }
                let done = try await store.unacknowledgedActions()
                let sent = ContinuousClock.now
                // The pool holds the check-in up to a period and answers as
                // soon as it has an action: work arrives at once.
                let actions: [Action]
                do {
                    actions = try await client.checkIn(
                        stats: try await stats(), instances: try await store.instances().map { InstanceSummary(name: $0.name, state: $0.state) },
                        done: done, holdSeconds: configuration.checkInSeconds)
                    metrics.checkIn(ContinuousClock.now - sent, ok: true)
                } catch {
                    metrics.checkIn(ContinuousClock.now - sent, ok: false)
                    throw error
                }
                try await store.acknowledge(done, at: Date())
                for action in actions { await apply(action) }
                backoff.reset()
                // After actions, check in again at once (to tell the pool they
                // are done). A pool that answered early with nothing (one
                // that does not hold check-ins) is asked again a period later.
                let rest = Duration.seconds(configuration.checkInSeconds) - (ContinuousClock.now - sent)
                if actions.isEmpty, rest > .seconds(1) {
                    let jitter = configuration.checkInJitterSeconds > 0 ? Double.random(in: 0...Double(configuration.checkInJitterSeconds)) : 0
                    try await Task.sleep(for: rest + .seconds(jitter))
                }
            } catch is CancellationError {
                return
            } catch let error as PoolClientError {
                if !authorized, case .refused(let status, _) = error, status == 401 || status == 409 {
                    throw AgentFatalError("\(error). Check pool.token_file (\(configuration.tokenFile)) and the appliance with `corral pool appliance list`.")
                }
                let delay = backoff.next()
                logger.warning("check-in failed: \(error); next try in \(delay)")
                try? await Task.sleep(for: delay)
            } catch {
                let delay = backoff.next()
                logger.error("check-in failed: \(error); next try in \(delay)")
                try? await Task.sleep(for: delay)
            }
        }
    }

    /// The hypervisor's capacity and what this agent's instances take of it.
    func stats() async throws -> HypervisorStats {
        let node = try await connection.nodeInfo()
        let instances = try await store.instances()
        let vcpus = instances.reduce(0) { $0 + $1.flavor.vcpus }
        let memory = instances.reduce(0) { $0 + $1.flavor.memory }
        let disk = instances.reduce(0) { $0 + $1.flavor.disk }
        var totalDisk = 0
        var availableDisk = 0
        if let attributes = try? FileManager.default.attributesOfFileSystem(forPath: configuration.stateDirectory),
            let size = (attributes[.systemSize] as? NSNumber)?.int64Value,
            let free = (attributes[.systemFreeSize] as? NSNumber)?.int64Value
        {
            totalDisk = Int(size >> 30)
            availableDisk = Int(free >> 30)
        }
        let totalMemory = Int(node.memoryKiB / 1024)
        var running = 0
        for domain in (try? await connection.domains()) ?? [] where instances.contains(where: { $0.uuid == domain.uuid.uuidString.lowercased() }) {
            if (try? await domain.state().isActive) == true { running += 1 }
        }
        return HypervisorStats(
            vcpus: Capacity(total: node.cpus * configuration.cpuOvercommit, free: max(0, node.cpus * configuration.cpuOvercommit - vcpus)),
            memoryMiB: Capacity(total: totalMemory, free: max(0, totalMemory - memory)),
            diskGiB: Capacity(total: totalDisk, free: max(0, min(availableDisk, totalDisk - disk))),
            running: running)
    }

    // MARK: Actions

    /// Applies one action of a check-in reply, unless its id was applied
    /// before. The id is recorded in the same transaction as the change it
    /// makes to the instance's record.
    func apply(_ action: Action) async {
        let name = action.instance
        do {
            guard try await !store.wasApplied(action.id) else { return }
            // The name becomes file names and a domain name: one that breaks
            // the pool's rule is refused before anything is touched.
            if let problem = ResourceName.problem(name) {
                _ = try await store.apply(action, .none, at: Date())
                logger.error(
                    "\(action.kind.rawValue) refused: the instance name \(String(reflecting: String(name.prefix(80)))) \(problem)",
                    metadata: ["action": "\(action.id)"])
                return
            }
            let known = try await store.instance(named: name)
            logger.info("action \(action.kind.rawValue) for \(name)", metadata: ["instance": "\(name)", "action": "\(action.id)"])
            switch action.kind {
            case .start:
                guard known == nil else {
                    _ = try await store.apply(action, .none, at: Date())
                    logger.notice("start of \(name) ignored: this appliance already has it", metadata: ["instance": "\(name)"])
                    return
                }
                guard let flavor = action.flavor else {
                    _ = try await store.apply(action, .none, at: Date())
                    logger.error("start of \(name) ignored: the action names no flavor", metadata: ["instance": "\(name)"])
                    return
                }
                let uuid = UUID()
                var instance = LocalInstance(
                    name: name, phase: .building, state: .starting, flavor: flavor,
                    expires: action.expires.map { Date(timeIntervalSince1970: TimeInterval($0)) },
                    uuid: uuid.uuidString.lowercased(), macAddress: macAddress(for: uuid), createdAt: Date())
                if case .user(let ports?) = configuration.network {
                    guard let port = try await store.freePort(in: ports) else {
                        throw BuildError("no free port left in network.ssh_forward_ports (\(ports.lowerBound)-\(ports.upperBound))")
                    }
                    instance.sshPort = port
                }
                let pickedUp = TimelineEntry(phase: .pickedUp, at: Date())
                let poolPhases = (action.timeline ?? []).filter { LaunchPhase.recordedByPool.contains($0.phase) }
                let applied = try await store.apply(action, .start(instance, timeline: poolPhases + [pickedUp]), at: Date())
                if applied { startBuild(name) }
            case .delete:
                guard known != nil else {
                    _ = try await store.apply(action, .none, at: Date())
                    try await store.enqueue(InstanceReport(name: name, state: .decommissioned), at: Date())
                    outboxWakeup.signal()
                    return
                }
                let applied = try await store.apply(action, .delete, at: Date())
                if applied { startDecommission(name) }
            case .lease:
                let expires = action.expires.map { Date(timeIntervalSince1970: TimeInterval($0)) }
                let applied = try await store.apply(action, .lease(expires), at: Date())
                if applied, known != nil { try await changeLease(name) }
            case .keys:
                guard known != nil, let keys = action.keys, let user = action.user else {
                    _ = try await store.apply(action, .none, at: Date())
                    logger.warning("keys for \(name) ignored: \(known == nil ? "this appliance does not have it" : "the action names no keys or user")", metadata: ["instance": "\(name)"])
                    return
                }
                if let problem = GuestKeys.problem(keys: keys, user: user, run: action.run) {
                    guard try await store.apply(action, .none, at: Date()) else { return }
                    logger.error("keys for \(name) refused: \(problem)", metadata: ["instance": "\(name)"])
                    _ = try await store.update(name) {
                        $0.keysAction = action.id
                        $0.keysApplied = action.id
                        $0.keysError = "the pool's SSH key list was refused: \(problem)"
                    }
                    reconcileWakeup.signal()
                    return
                }
                if try await store.apply(action, .keys(keys, user: user, run: action.run), at: Date()) { startRekey(name) }
            case .reboot, .powerOn, .powerOff:
                guard try await store.apply(action, .none, at: Date()) else { return }
                guard let known else {
                    logger.warning("\(action.kind.rawValue) of \(name) ignored: this appliance does not have it", metadata: ["instance": "\(name)"])
                    return
                }
                try await power(action.kind, known)
            }
        } catch {
            logger.error("action \(action.kind.rawValue) for \(name) failed: \(error)", metadata: ["instance": "\(name)", "action": "\(action.id)"])
            _ = try? await store.update(name) { $0.lastError = "\(action.kind.rawValue) failed: \(error)" }
            reconcileWakeup.signal()
        }
    }

    /// Carries out a power action on a built instance.
    func power(_ kind: Action.Kind, _ instance: LocalInstance) async throws {
        guard [.active, .booting, .errored].contains(instance.phase) else {
            logger.notice("\(kind.rawValue) of \(instance.name) ignored while it is \(instance.phase.rawValue)", metadata: ["instance": "\(instance.name)"])
            return
        }
        try await locks.withLock(instance.name) {
            let domain = try await self.domain(of: instance)
            switch kind {
            case .reboot:
                try await domain.reboot()
            case .powerOff:
                let outcome = try await domain.shutdown(timeout: .seconds(60))
                self.logger.info("\(instance.name) powered off (\(outcome))", metadata: ["instance": "\(instance.name)"])
            case .powerOn:
                guard try await !domain.state().isActive else { return }
                try await domain.start()
                try await self.store.update(instance.name) {
                    $0.phase = .booting
                    $0.bootedAt = Date()
                    $0.lastError = nil
                }
            default:
                break
            }
        }
        reconcileWakeup.signal()
    }

    /// Applies a changed lease end to the domain's metadata; a lease
    /// extended past now wakes an expired instance.
    func changeLease(_ name: String) async throws {
        try await locks.withLock(name) {
            guard let instance = try await self.store.instance(named: name) else { return }
            let domain = try? await self.domain(of: instance)
            if let domain {
                try await domain.setInstanceMetadata(self.metadata(for: instance))
            }
            if instance.phase == .expired, instance.expires.map({ $0 > Date() }) ?? true {
                if let domain, case .paused = try await domain.state() { try await domain.resume() }
                try await self.store.update(name) {
                    $0.phase = .active
                    $0.expiredAt = nil
                }
                self.logger.info("lease of \(name) extended; resumed", metadata: ["instance": "\(name)"])
            }
        }
        reconcileWakeup.signal()
    }
}
