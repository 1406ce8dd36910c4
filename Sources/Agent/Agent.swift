import CloudInit
import Crypto
import Foundation
import Libvirt
import Logging
import PoolAPI
import ServiceLifecycle
import Support
import Synchronization

/// A failure that stops the agent: it cannot do anything useful until a
/// person fixes what the message says.
public struct AgentFatalError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// A build step that failed, and why.
struct BuildError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The agent: checks in with the pool, applies its actions once each,
/// builds and boots instances through libvirt, reports every change, and
/// enforces leases, all as one Service. It shuts down on graceful shutdown
/// without touching running VMs; what it was doing resumes at its next
/// start from its SQLite state.
public final class Agent: Service, Sendable {
    public static let version = "corral-agent 0.1.0"

    let configuration: AgentConfiguration
    let logger: Logger
    let client: PoolClient
    let store: AgentStore
    let images: ImageCache
    let connection: Connection
    let virtType: VirtualizationType
    let paths: Paths

    /// Where instance files live under the state directory.
    /// Where an instance's files live. A name becomes a path only if it
    /// keeps the pool's name rule, and only if the path it makes lies
    /// inside its directory: a hostile name touches nothing.
    struct Paths: Sendable {
        var disks: String
        var consoles: String

        func disk(_ name: String) throws -> String { try inside(disks, name, ".qcow2") }
        func seed(_ name: String) throws -> String { try inside(disks, name, ".seed.iso") }
        func console(_ name: String) throws -> String { try inside(consoles, name, ".log") }

        private func inside(_ directory: String, _ name: String, _ suffix: String) throws -> String {
            if let problem = ResourceName.problem(name) {
                throw BuildError("the instance name \(String(reflecting: String(name.prefix(80)))) is refused: it \(problem)")
            }
            let root = URL(fileURLWithPath: directory).standardizedFileURL.path
            let path = URL(fileURLWithPath: "\(directory)/\(name)\(suffix)").standardizedFileURL.path
            guard path.hasPrefix(root + "/"), !path.dropFirst(root.count + 1).contains("/") else {
                throw BuildError("the path for instance \(name) leaves \(directory)")
            }
            return path
        }
    }

    private struct Reported: Equatable {
        var state: InstanceState
        var error: String?
        var addresses: [IPAddress]
        var reason: String?
        /// How many launch phases of the agent's own the report carried
        /// (the pool records the others itself, so they are no news).
        var phases = 0

        static func agentPhases(_ timeline: [TimelineEntry]) -> Int {
            timeline.count { !LaunchPhase.recordedByPool.contains($0.phase) }
        }
    }

    private struct State {
        var applianceName: String?
        var builds: [String: Task<Void, Never>] = [:]
        var decommissions: [String: Task<Void, Never>] = [:]
        var watches: [String: Task<Void, Never>] = [:]
        var reported: [String: Reported] = [:]
    }

    private let state = Mutex(State())
    private let locks = KeyedLocks()
    private let buildSlots: Semaphore
    private let outboxWakeup = Wakeup()
    let reconcileWakeup = Wakeup()
    /// QEMU's group: the files QEMU reads are 0640 to it.
    let qemuGroup: gid_t

    /// Opens the agent's store, image cache and libvirt connection, and
    /// settles the virtualization type.
    public static func open(configuration: AgentConfiguration, token: String, logger: Logger) async throws -> Agent {
        // Nothing from the pool is acted on unless signed by its pinned key.
        guard let keyText = configuration.signingKey, let keyBytes = ReplySignature.publicKeyBytes(keyText),
            let signingKey = try? Curve25519.Signing.PublicKey(rawRepresentation: keyBytes)
        else {
            throw AgentFatalError(
                "pool.signing_key is not set: run `corral agent register` again (it pins the pool's key), or set it to what `corral pool signing-key` prints on the pool")
        }
        let fileManager = FileManager.default
        let state = configuration.stateDirectory
        let paths = Paths(disks: "\(state)/disks", consoles: "\(state)/consoles")
        guard let qemuGroup = FileModes.groupID(configuration.qemuGroup) else {
            throw AgentFatalError(
                "libvirt.qemu_group '\(configuration.qemuGroup)' is not a group on this host; set it to the group in libvirt's qemu.conf")
        }
        for directory in [state, paths.disks, paths.consoles] {
            // Root's, and QEMU's group may pass through to the disks and seeds; nobody else.
            try fileManager.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try FileModes.set(directory, mode: 0o710, group: qemuGroup)
        }
        if case .user = configuration.network, configuration.isolateHost {
            try await GuestIsolation.apply(qemuUser: configuration.qemuUser, scratch: state)
            logger.info("guests are kept from the host's loopback (nftables table inet \(GuestIsolation.table))")
        }
        let store = try AgentStore(path: "\(state)/agent.sqlite")
        let images = try ImageCache(
            directory: configuration.imageDirectory, store: store, limits: configuration.images, qemuUser: configuration.qemuUser,
            qemuGroup: qemuGroup, logger: logger)
        let connection: Connection
        do {
            connection = try await Connection.open(configuration.libvirtURI)
        } catch {
            await images.shutdown()
            let reason = (error as? LibvirtError)?.message ?? "\(error)"
            throw AgentFatalError("cannot connect to libvirt at \(configuration.libvirtURI): \(reason)")
        }
        let resolved = await connection.resolveVirtualization(
            configuration.virtualization, workDirectory: URL(fileURLWithPath: state))
        logger.info("virtualization: \(resolved.type) (\(resolved.reason))")
        let client = PoolClient(baseURL: configuration.poolURL, token: token, version: version, signingKey: signingKey)
        return Agent(
            configuration: configuration, logger: logger, client: client, store: store, images: images,
            connection: connection, virtType: resolved.type, paths: paths, qemuGroup: qemuGroup)
    }

    init(
        configuration: AgentConfiguration, logger: Logger, client: PoolClient, store: AgentStore, images: ImageCache,
        connection: Connection, virtType: VirtualizationType, paths: Paths, qemuGroup: gid_t
    ) {
        self.qemuGroup = qemuGroup
        self.configuration = configuration
        self.logger = logger
        self.client = client
        self.store = store
        self.images = images
        self.connection = connection
        self.virtType = virtType
        self.paths = paths
        self.buildSlots = Semaphore(limit: configuration.maxConcurrentBuilds)
    }

    /// Releases the pool client, image cache and libvirt connection.
    public func close() async {
        await client.shutdown()
        await images.shutdown()
        await connection.close()
    }

    // MARK: Running

    public func run() async throws {
        try await recover()
        let events = try await connection.events()
        try await cancelWhenGracefulShutdown {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await self.checkInLoop() }
                group.addTask { await self.outboxLoop() }
                group.addTask { await self.reconcileLoop() }
                group.addTask {
                    for await event in events {
                        switch event {
                        case .domain(let event):
                            // Other domains on the host are none of the agent's business.
                            guard (try? await self.store.instance(named: event.name)) != nil else { continue }
                            self.logger.debug("libvirt: \(event)")
                            self.reconcileWakeup.signal()
                        case .disconnected(let reason):
                            self.logger.warning("libvirt connection lost (\(reason)); reconnecting")
                        case .reconnected:
                            self.logger.info("libvirt connection restored; reconciling every instance")
                            self.reconcileWakeup.signal()
                        }
                    }
                }
                // The first loop to end (with an error, or at cancellation) ends all.
                defer { group.cancelAll() }
                try await group.next()
            }
        }
        let tasks = state.withLock { Array($0.builds.values) + Array($0.decommissions.values) + Array($0.watches.values) }
        for task in tasks { task.cancel() }
        for task in tasks { await task.value }
        logger.info("agent stopped; running VMs were left as they are")
    }

    /// Picks up what a previous run left: builds and decommissions resume,
    /// files no instance owns are removed.
    func recover() async throws {
        let instances = try await store.instances()
        let names = Set(instances.map(\.name))
        for instance in instances {
            switch instance.phase {
            case .building: startBuild(instance.name)
            case .deleting: startDecommission(instance.name)
            case .booting, .active: startWatch(instance.name)
            default: break
            }
        }
        let fileManager = FileManager.default
        for (directory, suffixes) in [(paths.disks, [".qcow2", ".seed.iso", ".seed.iso.part"]), (paths.consoles, [".log"])] {
            for file in (try? fileManager.contentsOfDirectory(atPath: directory)) ?? [] {
                // A rotated console log (NAME.log.N) belongs to NAME too.
                let unrotated = file.lastIndex(of: ".").map { index in
                    file[file.index(after: index)...].allSatisfy(\.isNumber) && file[..<index].hasSuffix(".log") ? String(file[..<index]) : file
                } ?? file
                let owner = suffixes.lazy.filter { unrotated.hasSuffix($0) }.map { String(unrotated.dropLast($0.count)) }.first
                guard owner.map({ !names.contains($0) }) ?? true else { continue }
                logger.notice("removing \(directory)/\(file): no instance owns it")
                try? fileManager.removeItem(atPath: "\(directory)/\(file)")
            }
        }
        for domain in (try? await connection.domains()) ?? [] {
            guard let metadata = try? await domain.instanceMetadata(), !names.contains(metadata.instance) else { continue }
            if metadata.pool == configuration.poolURL {
                logger.warning("domain \(domain.name) carries Corral metadata for instance \(metadata.instance), which this agent does not know; left alone")
            }
        }
    }

    // MARK: Check-ins

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
                let actions = try await client.checkIn(
                    stats: try await stats(), instances: try await store.instances().map { InstanceSummary(name: $0.name, state: $0.state) },
                    done: done, holdSeconds: configuration.checkInSeconds)
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
                _ = try await store.apply(action, at: Date()) { _ in }
                logger.error(
                    "\(action.kind.rawValue) refused: the instance name \(String(reflecting: String(name.prefix(80)))) \(problem)",
                    metadata: ["action": "\(action.id)"])
                return
            }
            let known = try await store.instance(named: name)
            logger.info("action \(action.kind.rawValue) for \(name)", metadata: ["action": "\(action.id)"])
            switch action.kind {
            case .start:
                guard known == nil else {
                    _ = try await store.apply(action, at: Date()) { _ in }
                    logger.notice("start of \(name) ignored: this appliance already has it")
                    return
                }
                guard let flavor = action.flavor else {
                    _ = try await store.apply(action, at: Date()) { _ in }
                    logger.error("start of \(name) ignored: the action names no flavor")
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
                let record = instance
                let pickedUp = TimelineEntry(phase: .pickedUp, at: Date())
                let poolPhases = (action.timeline ?? []).filter { LaunchPhase.recordedByPool.contains($0.phase) }
                let applied = try await store.apply(action, at: Date()) { db in
                    try record.insert(db)
                    for entry in poolPhases + [pickedUp] { try AgentStore.record(db, entry, of: name, replacing: true) }
                }
                if applied { startBuild(name) }
            case .delete:
                guard known != nil else {
                    _ = try await store.apply(action, at: Date()) { _ in }
                    try await store.enqueue(InstanceReport(name: name, state: .decommissioned), at: Date())
                    outboxWakeup.signal()
                    return
                }
                let applied = try await store.apply(action, at: Date()) { db in
                    try db.execute(sql: "UPDATE instance SET phase = ? WHERE name = ?", arguments: [LocalInstance.Phase.deleting.rawValue, name])
                }
                if applied { startDecommission(name) }
            case .lease:
                let expires = action.expires.map { Date(timeIntervalSince1970: TimeInterval($0)) }
                let applied = try await store.apply(action, at: Date()) { db in
                    try db.execute(sql: "UPDATE instance SET expires = ? WHERE name = ?", arguments: [expires, name])
                }
                if applied, known != nil { try await changeLease(name) }
            case .reboot, .powerOn, .powerOff:
                guard try await store.apply(action, at: Date(), { _ in }) else { return }
                guard let known else {
                    logger.warning("\(action.kind.rawValue) of \(name) ignored: this appliance does not have it")
                    return
                }
                try await power(action.kind, known)
            }
        } catch {
            logger.error("action \(action.kind.rawValue) for \(name) failed: \(error)", metadata: ["action": "\(action.id)"])
            _ = try? await store.update(name) { $0.lastError = "\(action.kind.rawValue) failed: \(error)" }
            reconcileWakeup.signal()
        }
    }

    /// Carries out a power action on a built instance.
    private func power(_ kind: Action.Kind, _ instance: LocalInstance) async throws {
        guard [.active, .booting, .errored].contains(instance.phase) else {
            logger.notice("\(kind.rawValue) of \(instance.name) ignored while it is \(instance.phase.rawValue)")
            return
        }
        try await locks.withLock(instance.name) {
            let domain = try await self.domain(of: instance)
            switch kind {
            case .reboot:
                try await domain.reboot()
            case .powerOff:
                let outcome = try await domain.shutdown(timeout: .seconds(60))
                self.logger.info("\(instance.name) powered off (\(outcome))")
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
    private func changeLease(_ name: String) async throws {
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
                self.logger.info("lease of \(name) extended; resumed")
            }
        }
        reconcileWakeup.signal()
    }

    func metadata(for instance: LocalInstance) -> InstanceMetadata {
        InstanceMetadata(
            instance: instance.name, appliance: state.withLock { $0.applianceName } ?? "",
            pool: configuration.poolURL, leaseExpires: instance.expires)
    }

    func domain(of instance: LocalInstance) async throws -> Domain {
        guard let uuid = UUID(uuidString: instance.uuid) else { throw BuildError("instance \(instance.name) has no valid UUID") }
        return try await connection.domain(uuid: uuid)
    }

    // MARK: Builds

    private func startBuild(_ name: String) {
        state.withLock { state in
            guard state.builds[name] == nil else { return }
            state.builds[name] = Task {
                await self.runBuild(name)
                _ = self.state.withLock { $0.builds.removeValue(forKey: name) }
            }
        }
    }

    private func runBuild(_ name: String) async {
        do {
            // The start parameters come first, outside the build slots: the
            // pool may be following a slow callback for them, which must
            // delay only this instance, never the others' builds.
            guard let instance = try await store.instance(named: name), instance.phase == .building else { return }
            let parameters = try await startParameters(for: instance)
            try Task.checkCancellation()
            try await buildSlots.withPermit { try await self.build(name, parameters: parameters) }
        } catch is CancellationError {
            logger.notice("build of \(name) interrupted; it starts over when the agent runs again")
        } catch {
            logger.error("build of \(name) failed: \(error)")
            _ = try? await store.update(name) {
                $0.phase = .errored
                $0.lastError = "\(error)"
            }
            reconcileWakeup.signal()
        }
    }

    /// Builds and starts an instance: start parameters, image, overlay,
    /// seed, domain. A step that fails removes what it made; what earlier
    /// steps made stays for inspection until the instance is deleted.
    func build(_ name: String, parameters: StartParameters) async throws {
        guard let instance = try await store.instance(named: name), instance.phase == .building else { return }
        let started = ContinuousClock.now
        // A build that was interrupted starts over from nothing: one domain,
        // one disk, whatever happened before.
        try await removeArtifacts(of: instance)
        let base = try await images.image(parameters.image, forInstance: name)
        var kernel: (kernel: String, initrd: String?, cmdline: String)?
        if let boot = parameters.image.kernelBoot {
            let what = "the kernel of image '\(parameters.image.name)'"
            let kernelPath = try await images.file(boot.kernel, what: what, forInstance: name)
            var initrdPath: String?
            if let initrd = boot.initrd {
                initrdPath = try await images.file(initrd, what: "the initrd of image '\(parameters.image.name)'", forInstance: name)
            }
            kernel = (kernelPath, initrdPath, boot.cmdline)
        }
        try await store.record(.imageReady, of: name, at: Date())
        try Task.checkCancellation()
        try await makeOverlay(for: instance, base: base, format: parameters.image.diskFormat)
        let seed = Seed(
            instanceID: instance.uuid, hostname: name, instanceName: name, poolURL: configuration.poolURL,
            sshKeys: parameters.sshKeys, postCreate: parameters.postCreate.joined(separator: "\n"),
            macAddress: instance.macAddress)
        do {
            try await seed.writeImage(to: try paths.seed(name))
            // It holds the post-create script: root's, readable by QEMU's group only.
            try FileModes.set(try paths.seed(name), mode: 0o640, group: qemuGroup)
        } catch {
            throw BuildError("cannot write the cloud-init seed: \(error)")
        }
        try await store.record(.seedWritten, of: name, at: Date())
        try Task.checkCancellation()
        let template = DomainTemplate(
            name: name, uuid: instance.uuid, virtType: virtType.rawValue, flavor: instance.flavor, disk: try paths.disk(name),
            base: (base, parameters.image.diskFormat), seed: try paths.seed(name), consoleLog: try paths.console(name), macAddress: instance.macAddress,
            network: configuration.network, sshPort: instance.sshPort, kernel: kernel, metadata: metadata(for: instance))
        let domain: Domain
        do {
            domain = try await connection.defineDomain(xml: template.xml())
        } catch let error as LibvirtError {
            throw BuildError("libvirt refused the domain definition: \(error.message)")
        }
        try await store.record(.domainDefined, of: name, at: Date())
        try await locks.withLock(name) {
            do {
                try await domain.start()
            } catch let error as LibvirtError {
                throw BuildError("libvirt could not start the domain: \(error.message)")
            }
            let now = Date()
            try await self.store.update(name) {
                $0.phase = .booting
                $0.bootedAt = now
            }
            try await self.store.record(.domainStarted, of: name, at: now)
        }
        logger.info("\(name) started", metadata: ["seconds": "\(ContinuousClock.now - started)"])
        startWatch(name)
        reconcileWakeup.signal()
    }

    /// Watches a launch until the guest has finished cloud-init and
    /// answers on SSH (see LaunchWatch.swift).
    private func startWatch(_ name: String) {
        state.withLock { state in
            guard state.watches[name] == nil else { return }
            state.watches[name] = Task {
                await self.watchLaunch(name)
                _ = self.state.withLock { $0.watches.removeValue(forKey: name) }
            }
        }
    }

    /// Reports the instance as starting; the reply is its start parameters.
    /// Waits out an unreachable pool; a refusal fails the build.
    private func startParameters(for instance: LocalInstance) async throws -> StartParameters {
        var backoff = Backoff()
        while true {
            try Task.checkCancellation()
            do {
                let timeline = try await store.timeline(of: instance.name)
                let report = InstanceReport(
                    name: instance.name, state: .starting, flavor: instance.flavor,
                    expires: instance.expires.map { Int($0.timeIntervalSince1970) }, timeline: timeline)
                // Long enough for the pool to follow the longest callback chain
                // it allows (callbacks.timeout_seconds is at most 60 s).
                let parameters = try await client.report(report, timeout: .seconds(75))
                state.withLock {
                    $0.reported[instance.name] = Reported(
                        state: .starting, error: nil, addresses: [], phases: Reported.agentPhases(timeline))
                }
                return parameters
            } catch let error as PoolClientError {
                if case .refused(let status, let message) = error, status != 401, status != 409, !error.isTransient {
                    throw BuildError("the pool gave no start parameters (\(status)): \(message)")
                }
                let delay = backoff.next()
                logger.warning("cannot get start parameters of \(instance.name): \(error); next try in \(delay)")
                try await Task.sleep(for: delay)
            }
        }
    }

    /// Makes the instance's disk: a qcow2 overlay on the cached base image,
    /// sized to the flavor.
    private func makeOverlay(for instance: LocalInstance, base: String, format: String) async throws {
        let info = try await runProgram("qemu-img", ["info", "-f", format, "--output=json", base])
        guard info.status == 0,
            let json = try? JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [String: Any],
            let virtualSize = (json["virtual-size"] as? NSNumber)?.int64Value
        else { throw BuildError("cannot read the base image \(base): \(info.stderr)") }
        let wanted = Int64(instance.flavor.disk) << 30
        guard virtualSize <= wanted else {
            throw BuildError(
                "the image is \(virtualSize) bytes, larger than the flavor's disk of \(instance.flavor.disk) GiB; choose a bigger flavor")
        }
        let path = try paths.disk(instance.name)
        let result = try await runProgram(
            "qemu-img", ["create", "-q", "-f", "qcow2", "-F", format, "-b", base, path, "\(wanted)"])
        guard result.status == 0 else {
            try? FileManager.default.removeItem(atPath: path)
            throw BuildError("cannot create the instance's disk: \(result.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        try FileModes.set(path, mode: 0o640, group: qemuGroup)
    }

    /// Removes the instance's domain and files, whatever exists of them.
    private func removeArtifacts(of instance: LocalInstance) async throws {
        if let domain = try? await domain(of: instance) {
            if try await domain.state().isActive {
                do { try await domain.destroy() } catch let error as LibvirtError where error.code == .operationInvalid {}
            }
            do {
                try await domain.undefine()
            } catch let error as LibvirtError where error.code == .noDomain {}
        }
        let seed = try paths.seed(instance.name)
        let console = try paths.console(instance.name)
        // virtlogd rotates the console log to CONSOLE.0, .1, ... (max_backups).
        let rotated = ((try? FileManager.default.contentsOfDirectory(atPath: paths.consoles)) ?? [])
            .filter { $0.hasPrefix(instance.name + ".log.") && $0.dropFirst(instance.name.count + 5).allSatisfy(\.isNumber) }
            .map { "\(paths.consoles)/\($0)" }
        for path in [try paths.disk(instance.name), seed, seed + ".part", console] + rotated {
            if FileManager.default.fileExists(atPath: path) { try FileManager.default.removeItem(atPath: path) }
        }
    }

    // MARK: Decommissioning

    private func startDecommission(_ name: String) {
        state.withLock { state in
            guard state.decommissions[name] == nil else { return }
            let build = state.builds[name]
            state.watches[name]?.cancel()
            state.decommissions[name] = Task {
                // A build in progress stops first; its leftovers go with the rest.
                build?.cancel()
                await build?.value
                do {
                    try await self.decommission(name)
                } catch is CancellationError {
                } catch {
                    self.logger.error("decommissioning \(name) failed: \(error); retrying at the next start")
                }
                _ = self.state.withLock { $0.decommissions.removeValue(forKey: name) }
            }
        }
    }

    /// Destroys and undefines the domain, deletes its disk, seed and
    /// console, reports the instance decommissioned, and forgets it.
    func decommission(_ name: String) async throws {
        try await locks.withLock(name) {
            guard let instance = try await self.store.instance(named: name) else { return }
            try await self.removeArtifacts(of: instance)
            try await self.store.enqueue(InstanceReport(name: name, state: .decommissioned, flavor: instance.flavor), at: Date())
            try await self.store.remove(name)
            _ = self.state.withLock { $0.reported.removeValue(forKey: name) }
            self.logger.info("\(name) decommissioned")
        }
        outboxWakeup.signal()
    }

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
                    logger.warning("cannot reconcile \(instance.name): \(error)")
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
    /// know changed.
    func reconcile(_ name: String) async throws {
        let decommission: Bool = try await locks.withLock(name) {
            var decommission = false
            guard var instance = try await self.store.instance(named: name),
                ![.building, .deleting].contains(instance.phase)
            else { return false }
            let original = instance
            let now = Date()
            var domain: Domain? = nil
            do {
                domain = try await self.domain(of: instance)
            } catch let error as LibvirtError where error.code == .noDomain {}
            var domainState = try await domain?.state()

            if let expires = instance.expires, expires <= now, instance.phase != .expired {
                if let domain, case .running = domainState {
                    try await domain.suspend()
                    domainState = try await domain.state()
                }
                instance.phase = .expired
                instance.expiredAt = now
                self.logger.info("lease of \(name) ended; suspended, decommissioned in \(self.configuration.leaseGraceSeconds) s")
            }
            if instance.phase == .expired, let expiredAt = instance.expiredAt,
                now >= expiredAt.addingTimeInterval(TimeInterval(self.configuration.leaseGraceSeconds))
            {
                instance.phase = .deleting
                decommission = true
            }
            if instance.phase == .booting {
                let console = try self.paths.console(name)
                let up = (try? FileManager.default.attributesOfItem(atPath: console)[.size] as? NSNumber)?.intValue ?? 0 > 0
                if case .running = domainState, up {
                    instance.phase = .active
                    self.logger.info("\(name) is up", metadata: ["seconds": "\(now.timeIntervalSince(instance.bootedAt ?? now))"])
                } else if domainState.map({ !$0.isActive }) ?? true {
                    instance.phase = .errored
                    instance.lastError = "the guest stopped while booting (\(domainState?.description ?? "no domain"))"
                } else if now > (instance.bootedAt ?? now).addingTimeInterval(TimeInterval(self.configuration.bootTimeoutSeconds)) {
                    if let domain { _ = try? await domain.destroy() }
                    domainState = try await domain?.state()
                    instance.phase = .errored
                    instance.lastError =
                        "the guest did not come up within \(self.configuration.bootTimeoutSeconds) s (no console output); it was stopped, its disk kept"
                }
            }
            if instance.phase == .active, domain == nil {
                instance.phase = .errored
                instance.lastError = "its libvirt domain disappeared"
            }

            let poolState: InstanceState
            var error = instance.lastError
            switch (instance.phase, domainState) {
            case (.booting, _): poolState = .starting
            case (.active, .running?), (.active, .blocked?), (.active, .shuttingDown?): poolState = .running
            case (.active, .crashed?), (.active, .shutoff(.crashed)?), (.active, .shutoff(.failed)?):
                poolState = .suspended
                error = "the guest crashed (\(domainState!.description))"
            case (.active, _): poolState = .suspended
            default: poolState = .suspended
            }
            if instance.phase == .active, poolState == .running { error = nil }
            instance.lastError = error
            var addresses: [IPAddress] = []
            if poolState == .running, let domain {
                addresses = ((try? await domain.interfaceAddresses()) ?? []).flatMap(\.addresses).map(Self.ipAddress)
                if addresses.isEmpty, case .user = self.configuration.network {
                    addresses = [IPAddress(version: 4, scope: "private", address: userGuestAddress)]
                }
            }
            let timeline = try await self.store.timeline(of: name)
            let reported = Reported(
                state: poolState, error: error, addresses: addresses,
                reason: poolState == .suspended ? domainState?.description ?? "no domain" : nil,
                phases: Reported.agentPhases(timeline))
            let changed = self.state.withLock { $0.reported[name] != reported }
            instance.state = decommission ? instance.state : poolState
            // Only the fields reconciling owns are written, and only if no
            // action changed the phase meanwhile (a delete, a lease): a
            // whole-record save would undo what others wrote since the read.
            let reconciled = instance
            let kept = try await self.store.update(name) { stored in
                guard stored.phase == original.phase else { return }
                stored.phase = reconciled.phase
                stored.state = reconciled.state
                stored.lastError = reconciled.lastError
                stored.expiredAt = reconciled.expiredAt
            }
            guard kept?.phase == reconciled.phase else { return false }
            guard changed, !decommission else { return decommission }
            let report = InstanceReport(
                name: name, state: poolState, flavor: instance.flavor, expires: instance.expires.map { Int($0.timeIntervalSince1970) },
                ipAddresses: addresses, consoleOutput: self.consoleTail(name), error: error,
                reason: reported.reason, timeline: timeline)
            try await self.store.enqueue(report, at: now)
            self.state.withLock { $0.reported[name] = reported }
            self.logger.info("\(name): \(poolState)\(error.map { " (\($0))" } ?? "")")
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

    /// Sends queued reports oldest first; an unreachable pool is retried
    /// with capped exponential backoff and jitter, so nothing is lost or
    /// reordered while it is down.
    func outboxLoop() async {
        var backoff = Backoff()
        while !Task.isCancelled {
            let next: PendingReport?
            do {
                next = try await store.nextPending()
            } catch {
                logger.error("cannot read the report queue: \(error)")
                try? await Task.sleep(for: backoff.next())
                continue
            }
            guard let next else {
                await outboxWakeup.wait(timeout: .seconds(30))
                continue
            }
            do {
                logger.debug("delivering report \(next.sequence): \(next.report.name) state \(next.report.state.rawValue)")
                _ = try await client.report(next.report)
                try await store.delivered(next, at: Date())
                logger.debug("delivered report \(next.sequence)")
                backoff.reset()
            } catch let error as PoolClientError {
                switch error {
                case .refused(502, _), .refused(503, _):
                    // The pool kept the report; it only had no start parameters.
                    try? await store.delivered(next, at: Date())
                    backoff.reset()
                case .refused(let status, let message) where status != 401 && status != 409 && !error.isTransient:
                    logger.error("the pool refused the report of \(next.report.name) (\(status)): \(message); dropped")
                    try? await store.delivered(next, at: Date())
                default:
                    let delay = backoff.next()
                    logger.warning("report of \(next.report.name) not delivered: \(error); next try in \(delay)")
                    try? await Task.sleep(for: delay)
                }
            } catch {
                logger.error("cannot finish delivering a report: \(error)")
                try? await Task.sleep(for: backoff.next())
            }
        }
    }
}
